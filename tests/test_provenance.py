"""Provenance: the node's facts from the real Docker Engine and git, and a job's record.

NVML cannot exist here: the GPU inventory is the one stand-in (a fake object with the
same two functions as gpu.inventory).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import docker
import pytest

import gpu.inventory
from engine import provenance
from engine.db.models import ChallengeRow, ImageRow, PhaseRow
from gpu.inventory import GPU
from runners.base import RunResult, RunSpec, RunStatus
from tests.conftest import REPO

UUID_A = "GPU-11111111-2222-3333-4444-555555555555"
UUID_B = "GPU-66666666-7777-8888-9999-000000000000"


class FakeInventory:
    """Two GPUs, as NVML would list them on a node with a driver."""

    def __init__(self):
        self.asked = 0

    def list_gpus(self) -> list[GPU]:
        self.asked += 1
        return [GPU(UUID_B, 1, "NVIDIA H100 80GB HBM3", 80 * 2**30, "550.54.15"),
                GPU(UUID_A, 0, "NVIDIA A100-SXM4-40GB", 40 * 2**30, "550.54.15")]

    def cuda_driver_version(self) -> str | None:
        return "12.4"


class CountingClient:
    """The real Docker client, counting how often `docker info` is asked."""

    def __init__(self):
        self.api = self
        self.calls = 0
        self.client = docker.from_env()

    def info(self) -> dict:
        self.calls += 1
        return self.client.info()


@pytest.fixture
def info(docker_engine) -> dict:
    return docker.from_env().info()


@pytest.fixture(autouse=True)
def fresh_cache():
    provenance.forget_node_facts()
    yield
    provenance.forget_node_facts()


def git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(directory), "-c", "user.name=t", "-c",
                           "user.email=t@example.org", *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def test_node_facts_from_the_real_docker_engine(info):
    facts = provenance.node_facts(info, inventory=FakeInventory())
    assert facts["docker"]["server_version"] == info["ServerVersion"]
    # the daemon runs on this kernel: what uname says here is what the container gets
    assert facts["docker"]["kernel"] == platform.release()
    assert facts["docker"]["default_runtime"] in facts["docker"]["runtimes"]
    assert facts["docker"]["cgroup_version"] == info["CgroupVersion"]
    assert facts["node_name"] == socket.gethostname()
    assert facts["engine"]["version"] == importlib.metadata.version("epreuve")
    assert json.loads(json.dumps(facts, allow_nan=False)) == facts


def test_every_source_of_docker_info_gives_the_same_facts(info):
    client = docker.from_env()
    from_dict = provenance.node_facts(info, inventory=FakeInventory())["docker"]
    assert provenance.node_facts(client, inventory=FakeInventory())["docker"] == from_dict
    assert provenance.node_facts(client.api, inventory=FakeInventory())["docker"] == from_dict
    with pytest.raises(TypeError, match="no docker info"):
        provenance.node_facts(object(), inventory=FakeInventory())


def test_gpus_by_uuid_with_model_driver_and_cuda(info):
    gpus = provenance.node_facts(info, inventory=FakeInventory())["gpus"]
    assert gpus == [
        {"uuid": UUID_A, "index": 0, "model": "NVIDIA A100-SXM4-40GB",
         "memory_bytes": 40 * 2**30, "driver_version": "550.54.15", "cuda_version": "12.4"},
        {"uuid": UUID_B, "index": 1, "model": "NVIDIA H100 80GB HBM3",
         "memory_bytes": 80 * 2**30, "driver_version": "550.54.15", "cuda_version": "12.4"},
    ]


def test_the_real_inventory_lists_what_nvml_sees(docker_engine):
    """Here without NVML: no GPUs, no CUDA, never an error."""
    facts = provenance.node_facts(docker.from_env())
    assert [g["uuid"] for g in facts["gpus"]] == [g.uuid for g in gpu.inventory.list_gpus()]
    if not facts["gpus"]:
        assert gpu.inventory.cuda_driver_version() is None


def test_node_facts_are_collected_once_per_process(docker_engine):
    source = CountingClient()
    first = provenance.node_facts(source)
    first["docker"]["server_version"] = "changed by the caller"
    second = provenance.node_facts(source)
    assert source.calls == 1
    assert second["docker"]["server_version"] == source.client.info()["ServerVersion"]
    provenance.forget_node_facts()
    provenance.node_facts(source)
    assert source.calls == 2


def test_an_injected_inventory_is_asked_every_time(info):
    inventory = FakeInventory()
    provenance.node_facts(info, inventory=inventory)
    provenance.node_facts(info, inventory=inventory)
    assert inventory.asked == 2


def test_engine_commit_from_this_checkout():
    facts = provenance.engine_facts(REPO)
    assert facts["commit"] == git(REPO, "rev-parse", "HEAD")
    assert isinstance(facts["dirty"], bool)


def test_engine_commit_from_a_git_checkout_and_its_changes(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "file.py").write_text("x = 1\n")
    git(tmp_path, "add", "file.py")
    git(tmp_path, "commit", "-q", "-m", "one")
    facts = provenance.engine_facts(tmp_path, tmp_path / "none")
    assert facts["commit"] == git(tmp_path, "rev-parse", "HEAD")
    assert facts["dirty"] is False
    (tmp_path / "file.py").write_text("x = 2\n")
    assert provenance.engine_facts(tmp_path, tmp_path / "none")["dirty"] is True


def test_engine_commit_from_the_build_file_outside_a_checkout(tmp_path):
    commit = "a" * 40
    (tmp_path / "BUILD_COMMIT").write_text(commit + "\n")
    facts = provenance.engine_facts(tmp_path, tmp_path / "BUILD_COMMIT")
    assert facts["commit"] == commit
    assert facts["dirty"] is None


@pytest.mark.parametrize("content", ["not a commit", "a" * 39, "a" * 40 + "\n$(reboot)",
                                     "../../etc/passwd", ""])
def test_a_build_file_that_is_no_commit_is_not_believed(tmp_path, content):
    (tmp_path / "BUILD_COMMIT").write_text(content)
    assert provenance.engine_facts(tmp_path, tmp_path / "BUILD_COMMIT")["commit"] is None


def test_without_git_the_commit_is_unknown(monkeypatch, tmp_path):
    git(tmp_path, "init", "-q")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    facts = provenance.engine_facts(tmp_path, tmp_path / "none")
    assert facts["commit"] is None and facts["dirty"] is None


# -- the job's record ----------------------------------------------------------------------

def rows():
    image = ImageRow(image_id="sha256:" + "1" * 64, tar_sha256="2" * 64,
                     layers=["sha256:" + "3" * 64, "sha256:" + "4" * 64], reference="team/x",
                     architecture="amd64", user="1000:1000", size_bytes=10)
    challenge = ChallengeRow(id="liver", title="Liver", task="segmentation", definition={},
                             definition_sha256="5" * 64)
    phase = PhaseRow(challenge=challenge, slug="final", dataset_path="/d",
                     dataset_version="6" * 64, case_ids=["case-001", "case-002"])
    return image, challenge, phase


def spec(tmp_path: Path, gpus: tuple[str, ...] = ()) -> RunSpec:
    return RunSpec(image="sha256:" + "1" * 64, input_dir=tmp_path, output_dir=tmp_path / "out",
                   memory_bytes=2**30, cpus=2.0, timeout_seconds=120.0, user="1000:1000",
                   gpu_uuids=gpus, env={"B": "2", "A": "1"},
                   labels={"org.epreuve.job": "7"})


def record(tmp_path, info, gpus=(UUID_A,), outputs=None):
    image, challenge, phase = rows()
    node = provenance.node_facts(info, inventory=FakeInventory())
    started = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    finished = datetime(2026, 11, 30, 12, 5, 30, tzinfo=UTC)
    result = RunResult(status=RunStatus.SUCCEEDED, reason=None, message="",
                       image_id=image.image_id, user="1000:1000")
    return provenance.job_provenance(
        image=image, challenge=challenge, phase=phase, manifest_sha256="6" * 64,
        spec=spec(tmp_path, gpus), node=node, started_at=started, finished_at=finished,
        output_sha256=outputs or {"case-001": {"mask.nii.gz": "7" * 64}},
        case_ids=["case-001"], run_result=result)


def test_job_record_holds_every_field(tmp_path, info):
    record_ = record(tmp_path, info)
    assert record_["image"] == {"image_id": "sha256:" + "1" * 64, "tar_sha256": "2" * 64,
                                "layers": ["sha256:" + "3" * 64, "sha256:" + "4" * 64]}
    assert record_["dataset"] == {"version": "6" * 64, "manifest_sha256": "6" * 64,
                                  "case_ids": ["case-001"]}
    assert record_["challenge"] == {"id": "liver", "phase": "final",
                                    "definition_sha256": "5" * 64}
    assert record_["ran"] == {"image_id": "sha256:" + "1" * 64, "user": "1000:1000"}
    assert record_["started_at"] == "2026-11-30T12:00:00+00:00"
    assert record_["finished_at"] == "2026-11-30T12:05:30+00:00"
    assert record_["node_name"] == socket.gethostname()
    assert record_["docker"]["server_version"] == info["ServerVersion"]
    assert record_["engine"]["version"] == provenance.engine_facts()["version"]
    assert record_["outputs"]["sha256"] == {"case-001": {"mask.nii.gz": "7" * 64}}
    assert record_["format"] == provenance.PROVENANCE_FORMAT


def test_the_run_spec_is_recorded_whole_as_json(tmp_path, info):
    data = record(tmp_path, info)["run_spec"]
    assert data["input_dir"] == str(tmp_path) and data["output_dir"] == str(tmp_path / "out")
    assert data["memory_bytes"] == 2**30 and data["cpus"] == 2.0
    assert data["timeout_seconds"] == 120.0 and data["user"] == "1000:1000"
    assert data["gpu_uuids"] == [UUID_A]
    assert list(data["env"]) == ["A", "B"]
    assert data["command"] is None
    # every field of the RunSpec, and nothing that is not one
    assert set(data) == set(RunSpec.__dataclass_fields__)
    rebuilt = RunSpec(**{**data, "input_dir": Path(data["input_dir"]),
                         "output_dir": Path(data["output_dir"]),
                         "gpu_uuids": tuple(data["gpu_uuids"])})
    assert rebuilt == spec(tmp_path, (UUID_A,))


def test_the_record_survives_json(tmp_path, info):
    record_ = record(tmp_path, info)
    assert json.loads(json.dumps(record_, allow_nan=False)) == record_


def test_only_the_jobs_gpus_are_recorded_and_an_unknown_one_says_so(tmp_path, info):
    assert [g["model"] for g in record(tmp_path, info, (UUID_B,))["gpus"]] == [
        "NVIDIA H100 80GB HBM3"]
    assert record(tmp_path, info, ())["gpus"] == []
    unknown = "GPU-00000000-0000-0000-0000-000000000000"
    assert record(tmp_path, info, (unknown,))["gpus"] == [{"uuid": unknown}]


def test_outputs_digest_tells_one_changed_byte_and_ignores_order(tmp_path, info):
    one = {"a": {"x": "1" * 64}, "b": {"y": "2" * 64}}
    same = {"b": {"y": "2" * 64}, "a": {"x": "1" * 64}}
    changed = {"a": {"x": "1" * 64}, "b": {"y": "2" * 63 + "3"}}
    assert provenance.outputs_digest(one) == provenance.outputs_digest(same)
    assert provenance.outputs_digest(one) != provenance.outputs_digest(changed)
    assert record(tmp_path, info, outputs=one)["outputs"]["digest"] == \
        provenance.outputs_digest(one)


def test_the_record_does_not_share_the_cached_node_facts(tmp_path, docker_engine):
    node = provenance.node_facts(docker.from_env())
    image, challenge, phase = rows()
    record_ = provenance.job_provenance(
        image=image, challenge=challenge, phase=phase, manifest_sha256=None,
        spec=spec(tmp_path), node=node, started_at=None, finished_at=None, output_sha256={})
    record_["docker"]["runtimes"]["evil"] = "/bin/sh"
    assert "evil" not in provenance.node_facts(docker.from_env())["docker"]["runtimes"]
    assert record_["started_at"] is None and record_["ran"] == {"image_id": None, "user": None}
    assert os.getpid() in provenance._NODE_FACTS
