"""Hostile images against the real sandbox: each is contained, with the right typed reason.

Every network test aims only at this machine's own Docker bridge address.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import docker.errors
import pytest

from runners.base import FailureReason, MiB, RunSpec, RunStatus

pytestmark = pytest.mark.docker
SIOCGIFADDR = 0x8915


def probe(name: str, *args: str) -> tuple[str, ...]:
    return ("python3", f"/opt/probes/{name}.py", *args)


def report(output: Path, name: str) -> dict:
    return json.loads((output / name).read_text())


@pytest.fixture
def output(tmp_path) -> Path:
    return tmp_path / "output"


@pytest.fixture
def input_dir(tmp_path) -> Path:
    directory = tmp_path / "input"
    (directory / "case-001").mkdir(parents=True)
    (directory / "case-001" / "image.nii.gz").write_bytes(b"not really an image")
    return directory


def interface_ipv4(name: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        packed = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
    return socket.inet_ntoa(packed[20:24])


def local_ipv4(preferred: str) -> str:
    """An IPv4 address of this machine: `preferred`'s, else the first non-loopback one (a
    daemon started without its bridge has no docker0)."""
    names = [preferred] + [n for _, n in socket.if_nameindex() if n not in (preferred, "lo")]
    for name in names:
        with contextlib.suppress(OSError):
            return interface_ipv4(name)
    raise AssertionError(f"no IPv4 address on any of {names}")


def bridge_gateway() -> str:
    """The Docker bridge's gateway: an address of this very machine."""
    inspect = json.loads(subprocess.run(["docker", "network", "inspect", "bridge"], check=True,
                                        capture_output=True, text=True).stdout)[0]
    configs = inspect["IPAM"]["Config"] or [{}]
    address = configs[0].get("Gateway") or local_ipv4(
        inspect["Options"].get("com.docker.network.bridge.name", "docker0"))
    assert address and not address.startswith("0.")
    with socket.socket() as sock:
        sock.bind((address, 0))  # only a local address binds: we never aim off this machine
    return address


def test_no_network_but_loopback_and_host_unreachable(runner, adversarial, output):
    gateway = bridge_gateway()
    accepted = []
    with socket.socket() as listener:  # something that would answer, were there a route
        listener.bind((gateway, 0))
        listener.listen()
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        stop = threading.Event()

        def accept_loop():
            while not stop.is_set():
                try:
                    accepted.append(listener.accept())
                except OSError:
                    continue

        thread = threading.Thread(target=accept_loop, daemon=True)
        thread.start()
        result = runner.run(RunSpec(image=adversarial["probe"], output_dir=output,
                                    command=probe("network", gateway, str(port)),
                                    timeout_seconds=30))
        stop.set()
        thread.join()

    assert result.status is RunStatus.SUCCEEDED, result.log_tail
    seen = report(output, "network.json")
    assert seen["interfaces"] == ["lo"]
    assert seen["routes"] == []
    assert seen["connect_gateway"] == "ENETUNREACH"  # no route at all, not an unanswered one
    assert seen["raw_socket"] == "EPERM"
    assert seen["packet_socket"] == "EPERM"
    assert accepted == []


def test_fork_bomb_is_capped_by_pids_limit_and_stopped_in_time(runner, adversarial, output):
    limit = 64
    result = runner.run(RunSpec(image=adversarial["probe"], command=probe("fork_bomb"),
                                output_dir=output, pids_limit=limit, timeout_seconds=3,
                                stop_grace_seconds=1))
    assert result.reason is FailureReason.TIMEOUT
    forks = report(output, "forks.json")
    assert forks["errno"] == 11  # EAGAIN: the kernel refused the fork
    assert forks["forked"] < limit
    assert result.peak_pids is not None and result.peak_pids <= limit
    assert result.wall_seconds < 3 + 1 + 5


def test_memory_hog_is_oom_killed(runner, adversarial):
    limit = 128 * MiB
    result = runner.run(RunSpec(image=adversarial["probe"], command=probe("memory_hog"),
                                memory_bytes=limit, timeout_seconds=60))
    assert result.reason is FailureReason.OOM_KILLED
    assert result.exit_code == 137
    assert result.peak_memory_bytes >= 0.9 * limit
    assert "128.0 MiB" in result.message


def test_oom_kill_of_a_child_is_still_an_oom(runner, adversarial):
    """The parent survives its killed child and exits 3: exit code 137 alone would miss this."""
    result = runner.run(RunSpec(image=adversarial["probe"], command=probe("memory_hog", "--child"),
                                memory_bytes=128 * MiB, timeout_seconds=60))
    assert result.exit_code == 3
    assert "child exited with -9" in result.log_tail
    assert result.reason is FailureReason.OOM_KILLED


def test_sigterm_ignored_is_killed_after_grace(runner, adversarial):
    timeout, grace = 2.0, 1.0
    started = time.monotonic()
    result = runner.run(RunSpec(image=adversarial["probe"], command=probe("ignore_sigterm"),
                                timeout_seconds=timeout, stop_grace_seconds=grace))
    elapsed = time.monotonic() - started
    assert result.reason is FailureReason.TIMEOUT
    assert result.exit_code == 137  # SIGKILL: SIGTERM was ignored
    assert "ignoring SIGTERM" in result.log_tail
    assert timeout <= result.wall_seconds <= timeout + grace + 2
    assert elapsed <= timeout + grace + 10  # including provisioning and cleanup


def _largest_daemon_log(runner, stop: threading.Event, sizes: list[int]) -> None:
    while not stop.is_set():
        # this runner's containers only: other processes share the daemon
        for container in runner.api.containers(filters={"label": [
                "org.epreuve.managed", f"org.epreuve.owner={runner.owner}"]}):
            # The run may end, and its container and log vanish, between any two calls.
            with contextlib.suppress(docker.errors.NotFound, FileNotFoundError):
                log_path = runner.api.inspect_container(container["Id"]).get("LogPath")
                if log_path:
                    sizes.append(os.path.getsize(log_path))
        time.sleep(0.2)


def test_one_gib_log_flood_is_capped_everywhere(runner, adversarial):
    cap = 64 * 1024
    sizes: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_largest_daemon_log, args=(runner, stop, sizes), daemon=True)
    watcher.start()
    result = runner.run(RunSpec(image=adversarial["probe"], command=probe("log_flood"),
                                log_cap_bytes=cap, timeout_seconds=300))
    stop.set()
    watcher.join()
    assert result.status is RunStatus.SUCCEEDED, result.message
    assert result.log_bytes >= 1 << 30
    assert result.log_truncated
    assert len(result.log_tail.encode()) <= cap
    assert result.log_tail.endswith("flood done\n")
    assert sizes, "the daemon's log file was never observed"
    # json-file wraps each line in JSON; one message past the cap at most.
    assert max(sizes) <= cap + 8 * 1024


def test_writing_past_the_output_quota_stops_the_run(runner, adversarial, output):
    quota = 8 * MiB
    result = runner.run(RunSpec(image=adversarial["probe"], command=probe("fill_output"),
                                output_dir=output, output_quota_bytes=quota, timeout_seconds=60))
    assert result.reason is FailureReason.OUTPUT_QUOTA
    assert result.output_bytes <= quota + os.sysconf("SC_PAGE_SIZE")
    assert "8.0 MiB" in result.message


def test_tmp_is_size_capped(runner, adversarial, output):
    result = runner.run(RunSpec(image=adversarial["probe"], command=probe("fill_tmp"),
                                output_dir=output, tmp_size_bytes=16 * MiB, timeout_seconds=60))
    assert result.status is RunStatus.SUCCEEDED, result.log_tail
    seen = report(output, "tmp.json")
    assert seen["error"] == "ENOSPC"
    assert seen["written"] <= 16 * MiB


def test_read_only_filesystems_and_no_privileges(runner, adversarial, output, input_dir):
    before = sorted(p.relative_to(input_dir) for p in input_dir.rglob("*"))
    result = runner.run(RunSpec(image=adversarial["probe"], command=probe("privileges"),
                                input_dir=input_dir, output_dir=output, timeout_seconds=60))
    assert result.status is RunStatus.SUCCEEDED, result.log_tail
    seen = report(output, "privileges.json")
    assert seen["uid"] == 10001
    assert seen["write_input"] == "EROFS"
    assert seen["write_root"] == "EROFS"
    assert seen["write_usr"] == "EROFS"
    assert seen["write_etc_passwd"] == "EROFS"  # the read-only root, before any permission
    assert seen["mount_syscall"] == "EPERM"
    assert seen["mount_command_rc"] == 32  # mount(8): "mount failure"
    assert seen["chown_to_root"] == "EPERM"
    assert seen["setuid_root"] == "EPERM"
    assert seen["suid_binary_euid"] == "10001"  # no-new-privileges: the setuid bit is inert
    assert seen["docker_socket"] is False
    assert seen["mknod"] == "EPERM"
    assert sorted(p.relative_to(input_dir) for p in input_dir.rglob("*")) == before


def test_links_and_special_files_in_output_are_never_followed(runner, adversarial, output):
    result = runner.run(RunSpec(image=adversarial["probe"], command=probe("plant_links"),
                                output_dir=output, timeout_seconds=60))
    assert result.status is RunStatus.SUCCEEDED, result.log_tail
    collected = sorted(str(p.relative_to(output)) for p in output.rglob("*"))
    assert collected == ["case1", "case1/ok.txt"]
    assert not any(p.is_symlink() for p in output.rglob("*"))
    skipped = " ".join(result.skipped_outputs)
    for planted in ("shadow-link", "root-link", "case1/mask.nii.gz", "pipe"):
        assert planted in skipped
    assert result.output_files == 1


def test_image_env_cannot_claim_every_gpu(runner, adversarial, output):
    result = runner.run(RunSpec(image=adversarial["nvidia-env"], output_dir=output,
                                timeout_seconds=60))
    assert result.status is RunStatus.SUCCEEDED, result.log_tail
    assert report(output, "env.json")["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_root_image_runs_as_nobody(runner, adversarial, output):
    result = runner.run(RunSpec(image=adversarial["root-user"], output_dir=output,
                                timeout_seconds=60))
    assert result.status is RunStatus.SUCCEEDED, result.log_tail
    assert report(output, "whoami.json") == {"uid": 65534, "gid": 65534, "euid": 65534}
    assert result.user == "65534:65534"


def test_explicit_root_user_is_remapped_too(runner, adversarial, output):
    result = runner.run(RunSpec(image=adversarial["probe"], command=probe("whoami"),
                                user="0:0", output_dir=output, timeout_seconds=60))
    assert result.status is RunStatus.SUCCEEDED, result.log_tail
    assert report(output, "whoami.json") == {"uid": 65534, "gid": 65534, "euid": 65534}
    assert result.user == "65534:65534"


def test_missing_image_is_refused_not_pulled(runner):
    reference = "epreuve-test/never-built:latest"
    result = runner.run(RunSpec(image=reference))
    assert (result.status, result.reason) == (RunStatus.FAILED, FailureReason.IMAGE_INVALID)
    assert "never pulls" in result.message
    absent = subprocess.run(["docker", "image", "inspect", reference], capture_output=True)
    assert absent.returncode != 0


def test_image_without_command_is_refused(runner, adversarial):
    result = runner.run(RunSpec(image=adversarial["no-command"]))
    assert result.reason is FailureReason.IMAGE_INVALID
    assert "ENTRYPOINT" in result.message


def test_command_missing_in_image_is_a_typed_failure(runner, adversarial):
    result = runner.run(RunSpec(image=adversarial["probe"], command=("/no/such/binary",)))
    assert (result.status, result.reason, result.exit_code) == (
        RunStatus.FAILED, FailureReason.NONZERO_EXIT, 127)
    assert result.message == ("The container exited with code 127 (the command was not found "
                              "in the image). The end of its log usually says why.")
