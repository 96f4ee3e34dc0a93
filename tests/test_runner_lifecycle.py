"""The runner's own behaviour with real containers: accounting, cancellation, crash recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from runners.base import FailureReason, MiB, RunSpec, RunStatus
from runners.docker import LABEL_MANAGED, LABEL_OWNER, DockerRunner

pytestmark = pytest.mark.docker

BURN_ONE_CPU_SECOND = ("python3", "-c", textwrap.dedent("""
    import time
    start = time.process_time()
    while time.process_time() - start < 1.0:
        pass
"""))


def test_success_collects_outputs_and_measures(runner, adversarial, tmp_path):
    output = tmp_path / "out"
    result = runner.run(RunSpec(image=adversarial["probe"], output_dir=output))
    assert result.status is RunStatus.SUCCEEDED and result.reason is None
    assert (output / "hello.txt").read_text() == "hello\n"
    assert result.output_bytes == 6 and result.output_files == 1
    assert result.exit_code == 0
    assert result.wall_seconds is not None and result.wall_seconds >= 0
    assert result.cpu_seconds > 0 and result.peak_memory_bytes > 0
    assert result.accounting == "cgroup-v1" or result.accounting == "cgroup-v2"
    assert "hello from uid 10001" in result.log_tail


def test_cpu_seconds_are_exact(runner, adversarial):
    result = runner.run(RunSpec(image=adversarial["probe"], command=BURN_ONE_CPU_SECOND))
    assert result.succeeded
    assert 1.0 <= result.cpu_seconds <= 1.5  # one second of work plus interpreter start


def test_cpu_quota_is_enforced(runner, adversarial):
    result = runner.run(RunSpec(image=adversarial["probe"], command=BURN_ONE_CPU_SECOND, cpus=0.5))
    assert result.succeeded
    assert result.wall_seconds >= 1.8  # half a core: one CPU second takes two seconds


def test_peak_memory_is_the_kernels_peak(runner, adversarial):
    allocate = ("python3", "-c",
                "b = bytearray(200 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096])")
    result = runner.run(RunSpec(image=adversarial["probe"], command=allocate,
                                memory_bytes=1024 * MiB))
    assert result.succeeded, result.log_tail
    assert 200 * MiB <= result.peak_memory_bytes <= 300 * MiB


def test_nonzero_exit_is_typed_with_its_code(runner, adversarial):
    command = ("sh", "-c", "echo bad >&2; exit 3")
    result = runner.run(RunSpec(image=adversarial["probe"], command=command))
    assert result.reason is FailureReason.NONZERO_EXIT
    assert result.exit_code == 3
    assert "bad" in result.log_tail
    assert "code 3" in result.message


def test_input_is_visible_read_only_and_nothing_else(runner, adversarial, tmp_path):
    inputs = tmp_path / "inputs"
    (inputs / "case-7").mkdir(parents=True)
    (inputs / "case-7" / "ct.nii.gz").write_bytes(b"x")
    output = tmp_path / "out"
    result = runner.run(RunSpec(image=adversarial["probe"], input_dir=inputs, output_dir=output,
                                command=("python3", "/opt/probes/list_files.py", "/input")))
    assert result.succeeded, result.log_tail
    assert json.loads((output / "files.json").read_text())["files"] == ["/input/case-7/ct.nii.gz"]


def test_cancel_stops_the_run(runner, adversarial):
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    started = time.monotonic()
    result = runner.run(RunSpec(image=adversarial["probe"], command=("sleep", "600"),
                                stop_grace_seconds=1), cancel)
    assert result.reason is FailureReason.CANCELLED
    assert time.monotonic() - started < 15


def test_sampled_accounting_without_cgroups(adversarial, tmp_path):
    runner = DockerRunner(state_dir=tmp_path / "state", use_cgroups=False)
    command = ("python3", "-c", "import time; b = bytearray(64 << 20); time.sleep(2.5)")
    result = runner.run(RunSpec(image=adversarial["probe"], command=command))
    assert result.succeeded
    assert result.accounting == "sampled"
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes >= 32 * MiB


ORPHAN_SCRIPT = """
import sys
from pathlib import Path
from runners.base import RunSpec
from runners.docker import DockerRunner
runner = DockerRunner(state_dir=Path(sys.argv[1]), reap_orphans=False)
runner.run(RunSpec(image=sys.argv[2], command=("sleep", "600"), timeout_seconds=600))
"""


def _containers_owned_by(runner: DockerRunner, pid: int) -> list[dict]:
    found = runner.api.containers(all=True, filters={"label": LABEL_MANAGED})
    return [c for c in found if c["Labels"][LABEL_OWNER].split(":")[1] == str(pid)]


def test_containers_of_a_crashed_process_are_reaped_on_next_start(runner, adversarial, tmp_path):
    state = tmp_path / "state"
    process = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(state),
                                adversarial["probe"]])
    deadline = time.monotonic() + 60
    while not _containers_owned_by(runner, process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = _containers_owned_by(runner, process.pid)
    assert orphans, "the child never started its container"
    run_dirs = list(state.iterdir())
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # The container outlives its owner, but any runner on this host (a worker that an
    # earlier test left ending) may reap the container first. Its run directory is in this
    # state dir, which only the new runner reaps: that part proves the new runner did.

    DockerRunner(state_dir=state)  # a new runner starts: it reaps what is left

    assert _containers_owned_by(runner, process.pid) == []
    for run_dir in run_dirs:
        assert not os.path.ismount(run_dir / "output")
        assert not run_dir.exists()


def test_live_runners_containers_are_not_reaped(runner, adversarial, tmp_path):
    result_box = {}
    thread = threading.Thread(target=lambda: result_box.update(result=runner.run(
        RunSpec(image=adversarial["probe"], command=("sleep", "3")))))
    thread.start()
    deadline = time.monotonic() + 30
    while not _containers_owned_by(runner, os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert DockerRunner(state_dir=tmp_path / "other").reap_orphans() == []
    thread.join()
    assert result_box["result"].succeeded


def test_unreachable_daemon_is_a_clear_error(tmp_path):
    from runners.docker import DockerUnavailable

    with pytest.raises(DockerUnavailable, match="no Docker Engine answers"):
        DockerRunner(base_url=f"unix://{tmp_path}/nothing.sock", state_dir=Path(tmp_path))


def test_a_container_read_for_its_files_is_not_reaped_meanwhile(runner, adversarial, tmp_path):
    """The never-started container that reads an image's /etc/passwd belongs to a run in
    flight: a reaper of the same process (another runner) leaves it alone."""
    image = runner.api.inspect_image(adversarial["probe"])
    with runner._unstarted(image) as cid:
        assert DockerRunner(state_dir=tmp_path / "other").reap_orphans() == []
        assert runner.api.inspect_container(cid)["Id"] == cid
    assert runner.api.containers(all=True, filters={"id": cid}) == []
