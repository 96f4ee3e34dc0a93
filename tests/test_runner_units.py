"""The runner's pure parts, without a Docker Engine."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from engine.units import parse_size
from runners.base import FailureReason, GiB, InvalidRunSpec, MiB, RunSpec, require_paths
from runners.cgroups import RunCgroup, make_run_cgroup
from runners.docker import (
    REMAPPED_USER,
    container_env,
    decide_reason,
    effective_user,
    owner_alive,
    owner_token,
    parse_docker_time,
    sandbox_host_config,
    wall_seconds,
)
from runners.logs import LogTail
from runners.messages import exit_hint
from runners.output_area import OutputArea, TmpfsOutputArea

PASSWD = "root:x:0:0::/root:/bin/sh\ntoor:x:0:0::/:/bin/sh\nparticipant:x:10001:10001::/:/bin/sh\n"


@pytest.mark.parametrize(("requested", "image_user", "expected"), [
    (None, "", REMAPPED_USER),
    (None, "root", REMAPPED_USER),
    (None, "toor", REMAPPED_USER),
    (None, "0", REMAPPED_USER),
    (None, "00", REMAPPED_USER),
    (None, "+0:+0", REMAPPED_USER),
    (None, "0:0", REMAPPED_USER),
    (None, "10001", "10001:10001"),
    (None, "4242", "4242:65534"),  # no passwd line: runc would use gid 0
    (None, "participant", "10001:10001"),
    (None, "1000:0", "1000:65534"),
    (None, "1000:00", "1000:65534"),
    ("0", "10001", REMAPPED_USER),
    ("2000:2000", "", "2000:2000"),
])
def test_effective_user_is_never_root(requested, image_user, expected):
    assert effective_user(requested, image_user, lambda: (PASSWD, "")) == expected


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(stop_reason=None, over_quota=False, exit_code=0, oom_evidence=False), None),
    (dict(stop_reason=None, over_quota=False, exit_code=0, oom_evidence=True), None),
    (dict(stop_reason=None, over_quota=False, exit_code=1, oom_evidence=False),
     FailureReason.NONZERO_EXIT),
    (dict(stop_reason=None, over_quota=False, exit_code=3, oom_evidence=True),
     FailureReason.OOM_KILLED),
    (dict(stop_reason=FailureReason.TIMEOUT, over_quota=False, exit_code=137,
          oom_evidence=False), FailureReason.TIMEOUT),
    (dict(stop_reason=None, over_quota=True, exit_code=0, oom_evidence=False),
     FailureReason.OUTPUT_QUOTA),
    (dict(stop_reason=FailureReason.TIMEOUT, over_quota=True, exit_code=137, oom_evidence=False),
     FailureReason.OUTPUT_QUOTA),
    (dict(stop_reason=FailureReason.CANCELLED, over_quota=False, exit_code=143,
          oom_evidence=False), FailureReason.CANCELLED),
])
def test_decide_reason(kwargs, expected):
    assert decide_reason(**kwargs) is expected


def test_only_infrastructure_failures_are_retried():
    assert [r for r in FailureReason if r.retryable] == [FailureReason.INFRASTRUCTURE]


def test_docker_times_keep_sub_second_precision():
    started = parse_docker_time("2026-11-30T01:02:03.123456789Z")
    finished = parse_docker_time("2026-11-30T01:02:05.623456Z")
    assert started == datetime(2026, 11, 30, 1, 2, 3, 123456, tzinfo=UTC)
    assert wall_seconds(started, finished) == pytest.approx(2.5)
    assert parse_docker_time("0001-01-01T00:00:00Z") is None
    assert wall_seconds(finished, started) == 0.0  # daemon quirk: StartedAt after FinishedAt


def test_log_tail_keeps_the_last_bytes_and_counts_them_all():
    tail = LogTail(cap_bytes=10)
    for index in range(100):
        tail.feed(f"{index:03d}\n".encode())
    assert tail.total_bytes == 400
    assert tail.truncated
    assert tail.text() == "7\n098\n099\n"  # exactly the last 10 bytes
    short = LogTail(cap_bytes=1024)
    short.feed(b"all of it")
    assert not short.truncated and short.text() == "all of it"


def test_log_tail_replaces_broken_utf8():
    tail = LogTail(cap_bytes=3)
    tail.feed("é€".encode())  # the cut lands inside a character
    assert tail.text().endswith("€")


def test_sandbox_host_config_is_locked_down(tmp_path):
    spec = RunSpec(image="x", memory_bytes=3 * GiB, cpus=2, pids_limit=77, tmp_size_bytes=5 * MiB,
                   shm_size_bytes=7 * MiB, log_cap_bytes=123456)
    config = sandbox_host_config(spec, input_dir=tmp_path, output_dir=tmp_path / "o",
                                 cgroup_parent="/epreuve/r")
    assert config["network_mode"] == "none"
    assert config["cap_drop"] == ["ALL"]
    assert config["security_opt"] == ["no-new-privileges:true"]
    assert config["read_only"] is True and config["privileged"] is False and config["init"] is True
    assert config["mem_limit"] == config["memswap_limit"] == 3 * GiB
    assert config["nano_cpus"] == 2_000_000_000
    assert config["pids_limit"] == 77
    assert config["shm_size"] == 7 * MiB
    assert config["tmpfs"] == {"/tmp": f"rw,nosuid,nodev,size={5 * MiB}"}
    assert {u["Name"]: (u["Soft"], u["Hard"]) for u in config["ulimits"]}["core"] == (0, 0)
    assert config["log_config"]["Config"] == {"max-size": "123456", "max-file": "1"}
    mounts = {m["Target"]: m for m in config["mounts"]}
    assert mounts["/input"]["ReadOnly"] is True and mounts["/output"]["ReadOnly"] is False
    assert "device_requests" not in config
    assert config["cgroup_parent"] == "/epreuve/r"


def test_gpus_are_requested_by_uuid_and_always_named_in_the_environment(tmp_path):
    uuids = ("GPU-11111111-2222-3333-4444-555555555555", "GPU-66666666-7777-8888-9999-000000000000")
    spec = RunSpec(image="x", gpu_uuids=uuids, env={"NVIDIA_VISIBLE_DEVICES": "all", "A": "1"})
    config = sandbox_host_config(spec, input_dir=tmp_path, output_dir=tmp_path, cgroup_parent=None)
    (request,) = config["device_requests"]
    assert request["DeviceIDs"] == list(uuids) and request["Capabilities"] == [["gpu"]]
    assert container_env(spec) == {"A": "1", "NVIDIA_VISIBLE_DEVICES": ",".join(uuids)}
    assert container_env(RunSpec(image="x"))["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_run_spec_rejects_nonsense(tmp_path):
    with pytest.raises(ValueError, match="memory_bytes"):
        RunSpec(image="x", memory_bytes=0)
    spec = RunSpec(image="x", input_dir=tmp_path / "missing")  # plain data: no disk touched
    with pytest.raises(InvalidRunSpec, match="does not exist"):
        require_paths(spec)  # where a runner starts a run


@pytest.mark.parametrize(("text", "expected"), [
    ("512m", 512 * MiB), ("2g", 2 * GiB), ("2GiB", 2 * GiB), ("1.5k", 1536), ("100", 100),
    ("64 MB", 64 * MiB),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12x", "-1g", "g"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_exit_hints():
    assert "not found" in exit_hint(127)
    assert "SIGTERM" in exit_hint(143)
    assert exit_hint(3) == ""


def test_owner_token_identifies_this_process():
    assert owner_alive(owner_token())
    host = owner_token().split(":")[0]
    assert not owner_alive(f"{host}:999999999:1")
    assert owner_alive("another-host:1:1")  # not ours to judge


def _area_with_plants(area: OutputArea) -> None:
    (area.path / "case1").mkdir()
    (area.path / "case1" / "mask.bin").write_bytes(b"m" * 1000)
    os.symlink("/etc/shadow", area.path / "leak")
    os.mkfifo(area.path / "pipe")


def test_directory_output_area_collects_regular_files_only(tmp_path):
    path = tmp_path / "area"
    path.mkdir()
    area = OutputArea(path, quota_bytes=10_000)
    _area_with_plants(area)
    collected = area.collect(tmp_path / "collected")
    assert collected.files == 1 and collected.bytes == 1000
    assert sorted(collected.skipped) == ["leak (symbolic link, not collected)",
                                         "pipe (named pipe, not collected)"]
    assert (tmp_path / "collected" / "case1" / "mask.bin").read_bytes() == b"m" * 1000
    assert not area.over_quota()
    (path / "big").write_bytes(b"b" * 10_000)
    assert area.over_quota()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_tmpfs_output_area_is_a_hard_cap(tmp_path):
    area = OutputArea.create(tmp_path / "area", quota_bytes=1 * MiB)
    assert isinstance(area, TmpfsOutputArea)
    try:
        with pytest.raises(OSError, match="No space left"), open(area.path / "f", "wb") as f:
            for _ in range(4):
                f.write(b"x" * MiB)
                f.flush()
        assert area.over_quota()
    finally:
        area.release()
    assert not os.path.ismount(tmp_path / "area") and not (tmp_path / "area").exists()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_accounting_reads_the_run_parent(tmp_path):
    # No cgroup v2 host is available here: its interface files are laid out by hand.
    cgroup = RunCgroup("epreuve-abc", version=2, driver="cgroupfs", root=tmp_path)
    base = tmp_path / "epreuve" / "epreuve-abc"
    _write(base / "memory.peak", "104857600\n")
    _write(base / "memory.events", "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    _write(base / "cpu.stat", "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    _write(base / "pids.peak", "17\n")
    usage = cgroup.read()
    assert cgroup.parent == "/epreuve/epreuve-abc"
    assert (usage.peak_memory_bytes, usage.cpu_seconds, usage.oom_kills, usage.peak_pids) == (
        104857600, 2.5, 1, 17)
    _write(base / "cid" / "memory.events", "oom_kill 2\n")
    assert cgroup.read_leaf_oom_kills("cid") == 2


def test_cgroup_v2_systemd_driver_uses_a_slice(tmp_path):
    cgroup = RunCgroup("epreuve-abc", version=2, driver="systemd", root=tmp_path)
    assert cgroup.parent == "epreuve-abc.slice"
    assert cgroup.leaf("", "cid") == tmp_path / "epreuve.slice/epreuve-abc.slice/docker-cid.scope"


def test_cgroup_v1_accounting(tmp_path):
    cgroup = RunCgroup("epreuve-abc", version=1, driver="cgroupfs", root=tmp_path)
    _write(tmp_path / "memory/epreuve/epreuve-abc/memory.max_usage_in_bytes", "4096\n")
    _write(tmp_path / "cpuacct/epreuve/epreuve-abc/cpuacct.usage", "1500000000\n")
    _write(tmp_path / "pids/epreuve/epreuve-abc/pids.peak", "3\n")
    usage = cgroup.read()
    assert (usage.peak_memory_bytes, usage.cpu_seconds, usage.peak_pids) == (4096, 1.5, 3)
    cgroup.remove()  # non-empty directories stay: rmdir only removes real (empty) cgroups


def test_no_cgroup_accounting_for_unknown_drivers():
    assert make_run_cgroup("r", version=1, driver="systemd") is None
    assert make_run_cgroup("r", version=None, driver="cgroupfs") is None
