"""Challenge files (errors that name field and line), image intake refusals, GPU allocation."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import textwrap

import docker
import pytest

from engine.challenges import ChallengeError, load_challenge, parse_duration
from engine.images import ImageInvalid, check_config, inspect_tar, pin_tar
from engine.store import DirectoryStore
from gpu.allocator import GPUAllocator, NotEnoughGPUs
from tests.conftest import REPO

GOOD = """\
id: c1
title: A challenge
task: segmentation
output: {kind: segmentation, labels: [0, 1]}
ranking:
  metrics: [{metric: dice, label: 1}]
phases:
  - id: p1
    dataset: {path: data}
    limits: {memory: 2g, time_per_case: 90s}
"""


def write(tmp_path, text):
    path = tmp_path / "challenge.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_the_demo_challenge_is_valid():
    challenge = load_challenge(REPO / "challenges" / "demo-liver.yaml")
    assert [p.id for p in challenge.phases] == ["validation", "final"]
    assert challenge.phase("final").final and not challenge.phase("final").visibility.logs


def test_a_valid_file_parses_sizes_durations_and_paths(tmp_path):
    challenge = load_challenge(write(tmp_path, GOOD))
    phase = challenge.phase("p1")
    assert phase.limits.memory == 2 << 30 and phase.limits.time_per_case == 90
    assert phase.dataset.path == (tmp_path / "data").resolve()
    assert parse_duration("1d") == 86400


@pytest.mark.parametrize(("change", "expected"), [
    (("memory: 2g", "memory: 2 gigs"), "line 10, phases[0].limits.memory: '2 gigs' is not a size"),
    (("time_per_case: 90s", "time_per_case: soon"), "phases[0].limits.time_per_case: 'soon' is "
                                                    "not a duration"),
    (("task: segmentation", "task: detection"), "line 3, task: Input should be"),
    (("metric: dice", "metric: volume_difference_ml"), "line 6, ranking.metrics[0].metric: "
                                                       "metric 'volume_difference_ml' has no "
                                                       "ranking direction"),
    (("  - id: p1", "  - id: P 1"), "line 8, phases[0].id: String should match pattern"),
    (("    dataset: {path: data}\n", "    dataset: {path: data}\n    visibilty: {logs: true}\n"),
     "line 10, phases[0].visibilty: unknown key 'visibilty'; known: id, title"),
])
def test_errors_name_the_field_and_its_line(tmp_path, change, expected):
    with pytest.raises(ChallengeError) as error:
        load_challenge(write(tmp_path, GOOD.replace(*change)))
    assert expected in str(error.value)


def test_final_phase_cannot_show_logs(tmp_path):
    text = GOOD.replace("    limits:", "    final: true\n    visibility: {logs: true}\n    limits:")
    with pytest.raises(ChallengeError, match="a final phase never shows logs"):
        load_challenge(write(tmp_path, text))


def test_not_yaml_at_all(tmp_path):
    with pytest.raises(ChallengeError, match="not valid YAML"):
        load_challenge(write(tmp_path, "id: [unclosed"))


# -- image intake -----------------------------------------------------------------------


def fake_archive(path, members: dict[str, bytes], manifest: list | None = None) -> None:
    with tarfile.open(path, "w") as tar:
        if manifest is not None:
            members = {**members, "manifest.json": json.dumps(manifest).encode()}
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


CONFIG = {"architecture": "amd64", "os": "linux",
          "config": {"User": "1000", "Cmd": ["run"]}, "rootfs": {"diff_ids": []}}


def test_archive_checks(tmp_path):
    config = json.dumps(CONFIG).encode()
    fake_archive(tmp_path / "two.tar", {"a.json": config, "b.json": config},
                 [{"Config": "a.json"}, {"Config": "b.json"}])
    with pytest.raises(ImageInvalid, match="holds 2 images"):
        inspect_tar(tmp_path / "two.tar")
    fake_archive(tmp_path / "escape.tar", {"../../etc/cron.d/x": b"*", "a.json": config},
                 [{"Config": "a.json"}])
    with pytest.raises(ImageInvalid, match="unsafe path"):
        inspect_tar(tmp_path / "escape.tar")
    fake_archive(tmp_path / "nomanifest.tar", {"a.json": config})
    with pytest.raises(ImageInvalid, match=r"no manifest\.json"):
        inspect_tar(tmp_path / "nomanifest.tar")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(ImageInvalid, match="not a readable"):
        inspect_tar(tmp_path / "junk.tar")
    fake_archive(tmp_path / "big.tar", {"a.json": config}, [{"Config": "a.json"}])
    with pytest.raises(ImageInvalid, match="more than the 0 MiB allowed"):
        inspect_tar(tmp_path / "big.tar", max_bytes=1000)


@pytest.mark.parametrize(("config", "message"), [
    ({**CONFIG, "architecture": "arm64"}, "built for arm64"),
    ({**CONFIG, "config": {"User": "", "Cmd": ["x"]}}, "runs as root"),
    ({**CONFIG, "config": {"User": "0:0", "Cmd": ["x"]}}, "runs as root"),
    ({**CONFIG, "config": {"User": "1000"}}, "no ENTRYPOINT or CMD"),
])
def test_config_checks(config, message):
    with pytest.raises(ImageInvalid, match=message):
        check_config(config, "amd64")


@pytest.mark.docker
def test_a_real_root_image_is_refused_and_a_good_one_pinned_once(adversarial, tmp_path):
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    subprocess.run(["docker", "save", adversarial["root-user"], "-o", str(tmp_path / "r.tar")],
                   check=True)
    store = DirectoryStore(tmp_path / "store")
    with pytest.raises(ImageInvalid, match="runs as root"):
        pin_tar(tmp_path / "r.tar", client, store=store)
    subprocess.run(["docker", "save", adversarial["probe"], "-o", str(tmp_path / "p.tar")],
                   check=True)
    first = pin_tar(tmp_path / "p.tar", client, store=store)
    again = pin_tar(tmp_path / "p.tar", client, store=store)
    inspected = client.api.inspect_image(adversarial["probe"])
    assert first.image_id == again.image_id == inspected["Id"]
    assert first.layers == inspected["RootFS"]["Layers"]
    assert len(first.tar_sha256) == 64 and first.user == "10001:10001"


# -- GPU allocation -----------------------------------------------------------------------


def test_gpus_are_allocated_whole_and_never_twice(tmp_path):
    uuids = ["GPU-aaaaaaaa", "GPU-bbbbbbbb", "GPU-cccccccc"]
    allocator = GPUAllocator(uuids, tmp_path)
    other_worker = GPUAllocator(uuids, tmp_path)  # another process on the node, in effect
    first = allocator.allocate(2)
    assert len(first.uuids) == 2 and other_worker.free_count() == 1
    with pytest.raises(NotEnoughGPUs, match="2 GPU"):
        other_worker.allocate(2)
    second = other_worker.allocate(1)
    assert set(second.uuids).isdisjoint(first.uuids)
    first.release()
    second.release()
    assert allocator.free_count() == 3
    assert allocator.allocate(0).uuids == ()


def test_a_dead_holder_frees_its_gpu(tmp_path):
    import sys

    script = ("import sys, time; sys.path.insert(0, sys.argv[1]);"
              "from gpu.allocator import GPUAllocator;"
              "a = GPUAllocator(['GPU-x'], sys.argv[2]).allocate(1); print('held', flush=True);"
              "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(REPO), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert GPUAllocator(["GPU-x"], tmp_path).free_count() == 0
    holder.kill()
    holder.wait()
    assert GPUAllocator(["GPU-x"], tmp_path).free_count() == 1


def gpus_the_driver_lists() -> list[str]:
    """The UUIDs `nvidia-smi -L` lists: none on a machine without the NVIDIA driver."""
    import re
    import shutil

    if shutil.which("nvidia-smi") is None:
        return []
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sorted(re.findall(r"UUID: (GPU-[0-9a-f-]+)", listing.stdout))


def test_gpu_inventory_is_what_the_driver_lists():
    from gpu.inventory import list_gpus

    # without a driver: empty, never an error; with one: every GPU, by UUID
    assert sorted(g.uuid for g in list_gpus()) == gpus_the_driver_lists()


def test_evaluator_metrics_are_declared_and_ranked_by_name(tmp_path):
    with_image = GOOD.replace("ranking:", "metrics: {evaluation_image: org/eval:1}\nranking:")
    with pytest.raises(ChallengeError, match=r"needs metrics\.evaluator_metrics"):
        load_challenge(write(tmp_path, with_image))
    declared = GOOD.replace("ranking:", textwrap.dedent("""\
        metrics:
          evaluation_image: org/eval:1
          evaluator_metrics: [{name: score, larger_is_better: true, worst: 0}]
        ranking:"""))
    with pytest.raises(ChallengeError, match=r"line 9, ranking.metrics\[0\].metric: 'dice\[1\]' "
                                             "is not a metric the evaluation image reports"):
        load_challenge(write(tmp_path, declared))
    ranked = declared.replace("{metric: dice, label: 1}", "{metric: score}")
    assert load_challenge(write(tmp_path, ranked)).larger_is_better("score")
