"""Faults of the platform around one run, with real containers: a failed wait(), a container
killed from outside the engine, a daemon restarted mid-run, leftover cgroups, absurd limits.

None of them may end as the team's fault, and none may leave anything behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import docker.errors
import pytest
import requests.exceptions

from runners.base import FailureReason, InvalidRunSpec, RunSpec
from runners.cgroups import cgroup_hierarchies, leftover_run_cgroups, remove_cgroup_tree
from runners.docker import LABEL_RUN, DockerRunner
from tests.conftest import REPO

pytestmark = pytest.mark.docker

# Blocks until the test creates /input/go: the container is certainly running meanwhile.
AWAIT_GO = "while [ ! -e /input/go ]; do sleep 0.05; done; "


@pytest.fixture
def runner_factory(docker_engine, tmp_path):
    """A runner of the test's own, whose client calls a test may wrap with a fault."""
    made = []

    def make() -> DockerRunner:
        made.append(DockerRunner(state_dir=tmp_path / f"state-{len(made)}"))
        return made[-1]

    return make


def gated_spec(image: str, tmp_path: Path, script: str, **limits) -> RunSpec:
    inputs = tmp_path / "input"
    inputs.mkdir(exist_ok=True)
    (tmp_path / "output").mkdir(exist_ok=True)
    return RunSpec(image=image, command=("sh", "-c", AWAIT_GO + script), input_dir=inputs,
                   output_dir=tmp_path / "output", stop_grace_seconds=1,
                   labels={"org.epreuve.test": uuid.uuid4().hex}, **limits)


def release(spec: RunSpec) -> None:
    (Path(spec.input_dir) / "go").touch()


def run_in_background(runner: DockerRunner, spec: RunSpec) -> tuple[threading.Thread, dict]:
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=runner.run(spec)), daemon=True)
    thread.start()
    return thread, box


def running_container(runner: DockerRunner, spec: RunSpec, limit: float = 60.0) -> dict:
    label = f"org.epreuve.test={spec.labels['org.epreuve.test']}"
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        found = runner.api.containers(filters={"label": label, "status": "running"})
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError("the run never started its container")


# -- a failed wait() is never an exit -----------------------------------------------------


@pytest.mark.parametrize("fault", [
    docker.errors.APIError("500 Server Error: transient"),
    requests.exceptions.ConnectionError("connection reset by peer"),
])
def test_a_failed_wait_is_not_an_exit(runner_factory, adversarial, tmp_path, fault):
    """A transient error of wait() used to report a running container as succeeded, exit 0,
    and collect whatever was half written. The truth is its real exit, here 3."""
    runner = runner_factory()
    spec = gated_spec(adversarial["probe"], tmp_path, "echo whole > /output/out.txt; exit 3")
    real_wait, calls = runner.api.wait, []

    def flaky_wait(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise fault  # the container is blocked on /input/go: certainly still running
        release(spec)
        return real_wait(*args, **kwargs)

    runner.api.wait = flaky_wait
    result = runner.run(spec)
    assert (result.reason, result.exit_code) == (FailureReason.NONZERO_EXIT, 3)
    assert (tmp_path / "output" / "out.txt").read_text() == "whole\n"
    assert len(calls) == 2


# -- a container killed from outside the engine ----------------------------------------------


@pytest.mark.parametrize("how", ["kill", "stop", "remove"])
def test_a_container_stopped_from_outside_is_the_platforms_fault(runner, adversarial, tmp_path,
                                                                  how):
    spec = gated_spec(adversarial["probe"], tmp_path, "exit 0", timeout_seconds=120)
    thread, box = run_in_background(runner, spec)
    container = running_container(runner, spec)
    operator = docker.APIClient(base_url=runner.base_url)
    if how == "kill":
        operator.kill(container["Id"], signal="SIGKILL")
    elif how == "stop":
        operator.stop(container["Id"], timeout=1)
    else:
        operator.remove_container(container["Id"], force=True)
    thread.join(120)
    result = box["result"]
    assert result.reason is FailureReason.INFRASTRUCTURE
    assert "not caused by your submission" in result.message
    assert "Traceback" not in result.message


def test_a_container_paused_from_outside_then_timed_out_is_the_platforms_fault(
        runner, adversarial, tmp_path):
    spec = gated_spec(adversarial["probe"], tmp_path, "exit 0", timeout_seconds=2)
    thread, box = run_in_background(runner, spec)
    docker.APIClient(base_url=runner.base_url).pause(running_container(runner, spec)["Id"])
    thread.join(120)
    assert box["result"].reason is FailureReason.INFRASTRUCTURE
    assert "pause" in box["result"].detail


def test_our_own_timeout_stays_the_teams(runner, adversarial, tmp_path):
    spec = gated_spec(adversarial["probe"], tmp_path, "exit 0", timeout_seconds=1)
    result = runner.run(spec)  # never released: it runs into its limit, and we stop it
    assert result.reason is FailureReason.TIMEOUT


@pytest.mark.parametrize(("script", "code"), [
    ("kill -9 $$", 137),  # the participant's own SIGKILL: its exit, not an outside kill
    ("kill -TERM $$", 143),
    ("python3 -c 'import os, signal; os.kill(1, signal.SIGKILL)'; exit 5", 5),  # init ignores
])
def test_a_process_that_kills_itself_stays_the_teams_fault(runner, adversarial, tmp_path,
                                                           script, code):
    spec = gated_spec(adversarial["probe"], tmp_path, script)
    release(spec)
    result = runner.run(spec)
    assert (result.reason, result.exit_code) == (FailureReason.NONZERO_EXIT, code)


# -- absurd limits are refused before anything is created ------------------------------------


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -float("inf"), 0, -1,
                                     7 * 24 * 3600 + 1, True])
def test_absurd_timeouts_are_refused_before_a_run(timeout):
    with pytest.raises(InvalidRunSpec, match="timeout_seconds"):
        RunSpec(image="any", timeout_seconds=timeout)


@pytest.mark.parametrize("grace", [float("nan"), float("inf"), -1, 3601])
def test_absurd_stop_grace_is_refused(grace):
    with pytest.raises(InvalidRunSpec, match="stop_grace_seconds"):
        RunSpec(image="any", stop_grace_seconds=grace)


@pytest.mark.parametrize("timeout", ["nan", "inf", "-5", "1e12"])
def test_the_sandbox_cli_refuses_absurd_timeouts_without_a_traceback(timeout):
    cli = Path(sys.executable).parent / "epreuve"
    done = subprocess.run([str(cli), "sandbox", "run", "--timeout", timeout, "no-such-image"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "timeout_seconds" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


# -- cgroups: none left in any hierarchy -----------------------------------------------------


def test_no_run_cgroup_is_left_in_any_hierarchy(runner_factory, adversarial):
    runner = runner_factory()
    if runner.cgroup_driver != "cgroupfs":
        pytest.skip("the per-run layout checked here is cgroupfs'")
    names, create = [], runner.api.create_container

    def spy(*args, **kwargs):
        if "name" in kwargs:  # the runs, not the never-started reads of /etc/passwd
            names.append(kwargs["name"])
        return create(*args, **kwargs)

    runner.api.create_container = spy
    for _ in range(3):
        assert runner.run(RunSpec(image=adversarial["probe"], command=("true",))).succeeded
    hierarchies = cgroup_hierarchies()
    assert len(hierarchies) >= 1 and len(names) == 3
    left = [mount / "epreuve" / name for mount in hierarchies for name in names
            if (mount / "epreuve" / name).exists()]
    assert left == []


def test_a_group_in_use_is_left_alone_then_removed_once_empty():
    """Removal never disturbs a group with a process in it (nor waits for it), and takes the
    whole tree once it is empty."""
    pids = next((m for m in cgroup_hierarchies() if m.name == "pids"), None)
    if pids is None:
        pytest.skip("no v1 pids hierarchy on this host")
    group = pids / "epreuve" / f"epreuve-{uuid.uuid4().hex[:12]}"
    (group / "leaf").mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        (group / "leaf" / "cgroup.procs").write_text(str(sleeper.pid))
        assert remove_cgroup_tree(group) is False
        assert (group / "leaf").is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_cgroup_tree(group) is True
    assert not group.exists()


def test_orphan_cgroups_without_a_container_are_reaped(runner_factory):
    """A worker killed between removing its container and removing its cgroups."""
    hierarchies = [m for m in cgroup_hierarchies() if (m / "epreuve").is_dir()]
    if not hierarchies:
        pytest.skip("no /epreuve parent group on this host")
    name = f"epreuve-{uuid.uuid4().hex[:12]}"
    made = []
    for mount in hierarchies:
        (mount / "epreuve" / name).mkdir()  # mkdir in a cgroup hierarchy makes a cgroup
        made.append(mount / "epreuve" / name)
    assert name in leftover_run_cgroups()
    runner_factory().reap_orphans()
    assert [path for path in made if path.exists()] == []


# -- a Docker daemon restarted in the middle of a run ----------------------------------------


class SecondDaemon:
    """A dockerd of our own (socket, data root, exec root, pid file in a temp dir): restarting
    it disturbs no one else's containers."""

    def __init__(self, root: Path, *args: str):
        self.root = root
        self.args = args  # more of dockerd's flags (--live-restore)
        self.socket = root / "docker.sock"
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen | None = None
        # A bridge of its own: with --bridge=none, dockerd deletes the host's docker0, which
        # would cut every later bridge-networked container of the main daemon.
        self.bridge = f"epv{uuid.uuid4().hex[:8]}"

    def start(self) -> None:
        self._forget_dead_containerd()
        if not Path(f"/sys/class/net/{self.bridge}").exists():
            subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True)
        with open(self.root / "dockerd.log", "ab") as log:
            self.process = subprocess.Popen(
                ["dockerd", "--data-root", str(self.root / "data"), "--exec-root",
                 str(self.root / "exec"), "--pidfile", str(self.root / "dockerd.pid"),
                 "-H", self.url, f"--bridge={self.bridge}", "--iptables=false",
                 "--ip6tables=false", "--ip-masq=false", *self.args],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "dockerd.log").read_text()[-2000:])
            probe = subprocess.run(["docker", "-H", self.url, "version"], capture_output=True)
            if probe.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("the second dockerd did not answer within 60 s")

    def _forget_dead_containerd(self) -> None:
        """dockerd reuses the containerd of its pid file if that pid looks alive; after a crash
        the old one is dying (or its pid reused), and the new daemon would wait for it forever."""
        pid_file = self.root / "exec" / "containerd" / "containerd.pid"
        if not pid_file.exists():
            return
        pid = int(pid_file.read_text().strip() or 0)
        deadline = time.monotonic() + 30
        while pid and _is_our_containerd(pid, self.root) and time.monotonic() < deadline:
            time.sleep(0.1)
        pid_file.unlink(missing_ok=True)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(120)

    def close(self) -> None:
        self.stop()
        _kill_processes_of(self.root)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, check=False)
        containerd_pid = self.root / "exec" / "containerd" / "containerd.pid"
        if containerd_pid.exists():  # the containerd this daemon started, if it outlived it
            pid = int(containerd_pid.read_text().strip() or 0)
            if pid and _is_our_containerd(pid, self.root):
                os.kill(pid, signal.SIGTERM)


def _kill_processes_of(root: Path) -> None:
    """What this test's daemon left running (a shim that outlived a crash, and its tree)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    ours = {pid for pid in parents if _is_our_containerd(pid, root)}
    while True:
        more = {pid for pid, parent in parents.items() if parent in ours} - ours
        if not more:
            break
        ours |= more
    for pid in ours:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _is_our_containerd(pid: int, root: Path) -> bool:
    try:  # a zombie's cmdline is empty: it counts as gone
        return str(root) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


@pytest.fixture(scope="module")
def second_daemon(docker_engine):
    root = Path(f"/tmp/epreuve-dd-{uuid.uuid4().hex[:8]}")  # short: unix socket paths are
    root.mkdir(mode=0o700)
    daemon = SecondDaemon(root)
    try:
        daemon.start()
    except (OSError, RuntimeError) as exc:
        pytest.fail(f"a second dockerd cannot start here: {exc}")
    save = subprocess.Popen(["docker", "save", "epreuve/base:3.11"], stdout=subprocess.PIPE)
    subprocess.run(["docker", "-H", daemon.url, "load", "-q"], stdin=save.stdout, check=True,
                   capture_output=True)
    save.wait()
    yield daemon
    daemon.close()
    for mount in sorted(_mounts_under(root), reverse=True):  # the daemon's own, left behind
        subprocess.run(["umount", "-l", mount], check=False)
    subprocess.run(["rm", "-rf", str(root)], check=False)


def _mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    return [point for point in points if point == str(root) or point.startswith(f"{root}/")]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_a_daemon_restarted_mid_run_is_infrastructure_and_the_container_is_reaped(
        second_daemon, tmp_path, how):
    # the daemon stays away past the run's patience (2 s): it gives up, as INFRASTRUCTURE
    runner = DockerRunner(base_url=second_daemon.url, state_dir=tmp_path / "state",
                          daemon_return_seconds=2)
    spec = gated_spec("epreuve/base:3.11", tmp_path, "exit 0", timeout_seconds=120)
    thread, box = run_in_background(runner, spec)
    container = running_container(runner, spec)
    run_name = container["Labels"][LABEL_RUN]

    second_daemon.stop(how)  # a restart (TERM) or a crash (KILL), in the middle of the run
    thread.join(120)
    result = box["result"]
    assert result.reason is FailureReason.INFRASTRUCTURE
    assert "not caused by your submission" in result.message
    assert "Traceback" not in result.message
    assert result.detail  # what happened, for organisers

    second_daemon.start()
    runner.reap_orphans()  # as the next run would, once the daemon answers again
    assert runner.api.containers(all=True, filters={"label": f"{LABEL_RUN}={run_name}"}) == []
    assert run_name not in leftover_run_cgroups()
    assert not (tmp_path / "state" / run_name).exists()


def test_a_run_after_the_daemon_came_back_reaps_what_was_left(second_daemon, tmp_path):
    # the daemon stays away past the run's patience (2 s): it gives up, as INFRASTRUCTURE
    runner = DockerRunner(base_url=second_daemon.url, state_dir=tmp_path / "state",
                          daemon_return_seconds=2)
    spec = gated_spec("epreuve/base:3.11", tmp_path, "exit 0", timeout_seconds=120)
    thread, box = run_in_background(runner, spec)
    run_name = running_container(runner, spec)["Labels"][LABEL_RUN]
    second_daemon.stop(signal.SIGKILL)
    thread.join(120)
    assert box["result"].reason is FailureReason.INFRASTRUCTURE
    second_daemon.start()

    after = runner.run(RunSpec(image="epreuve/base:3.11", command=("true",)))
    assert after.succeeded, after.message
    assert runner.api.containers(all=True, filters={"label": f"{LABEL_RUN}={run_name}"}) == []


def test_an_unreachable_daemon_mid_run_never_raises(runner_factory, adversarial, tmp_path):
    """Every daemon call failing after the container started: a typed result, no traceback."""
    runner = runner_factory()
    runner.daemon_return_seconds = 2  # it does not come back within the run's patience
    spec = gated_spec(adversarial["probe"], tmp_path, "exit 0")

    def gone(*args, **kwargs):
        raise requests.exceptions.ConnectionError("the daemon is away")

    def wait_then_lose_the_daemon(*args, **kwargs):
        for name in ("wait", "inspect_container", "remove_container", "kill", "stop"):
            setattr(runner.api, name, gone)
        raise requests.exceptions.ConnectionError("connection aborted")

    runner.api.wait = wait_then_lose_the_daemon
    result = runner.run(spec)
    assert result.reason is FailureReason.INFRASTRUCTURE
    assert re.search(r"DaemonLost", result.detail)
    # the daemon answers again: the container left behind is reaped before the next run
    for name in ("wait", "inspect_container", "remove_container", "kill", "stop"):
        delattr(runner.api, name)
    assert runner.run(RunSpec(image=adversarial["probe"], command=("true",))).succeeded
    label = f"org.epreuve.test={spec.labels['org.epreuve.test']}"
    assert runner.api.containers(all=True, filters={"label": label}) == []


# -- a dead run's output area, when its container is already gone ----------------------------

ORPHAN_RUN = """
import sys
from pathlib import Path
from runners.base import RunSpec
from runners.docker import DockerRunner
runner = DockerRunner(state_dir=Path(sys.argv[1]), reap_orphans=False)
runner.run(RunSpec(image=sys.argv[2], command=("sleep", "600"),
                   labels={"org.epreuve.test": sys.argv[3]}))
"""


def test_a_dead_runs_output_area_is_reaped_even_without_its_container(runner, adversarial,
                                                                       tmp_path):
    state, tag = tmp_path / "state", uuid.uuid4().hex
    child = subprocess.Popen([sys.executable, "-c", ORPHAN_RUN, str(state), adversarial["probe"],
                              tag], env={**os.environ, "PYTHONPATH": str(REPO)})
    spec_like = RunSpec(image="x", labels={"org.epreuve.test": tag})
    container = running_container(runner, spec_like)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    (run_dir,) = list(state.iterdir())
    # another runner on the node (another state directory) reaped the container first
    runner.api.remove_container(container["Id"], force=True)

    DockerRunner(state_dir=state)  # the next runner on this state directory starts

    assert not os.path.ismount(run_dir / "output")
    assert not run_dir.exists()


def test_the_sandbox_cli_reports_a_daemon_restart_without_a_traceback(second_daemon, tmp_path):
    """`epreuve sandbox run` used to die with a ConnectionError traceback from
    remove_container, leaving the container behind."""
    cli = Path(sys.executable).parent / "epreuve"
    inputs = tmp_path / "input"
    inputs.mkdir()
    process = subprocess.Popen(
        [str(cli), "sandbox", "run", "--input", str(inputs), "--timeout", "120",
         "epreuve/base:3.11", "--", "sh", "-c", AWAIT_GO + "exit 0"],
        env={**os.environ, "DOCKER_HOST": second_daemon.url, "PYTHONPATH": str(REPO),
             "EPREUVE_STATE_DIR": str(tmp_path / "state")},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    api = docker.APIClient(base_url=second_daemon.url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not api.containers(filters={"status": "running"}):
        time.sleep(0.05)
    assert api.containers(filters={"status": "running"}), "the CLI never started its container"
    second_daemon.stop(signal.SIGTERM)  # as `systemctl restart docker` does
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    said = " ".join(out.split())  # the terminal wraps lines
    assert "INFRASTRUCTURE" in said and "not caused by your submission" in said
    assert "Traceback" not in out + err
    second_daemon.start()
    leftover = DockerRunner(base_url=second_daemon.url, state_dir=tmp_path / "state" / "runs")
    assert leftover.api.containers(all=True) == []  # the dead CLI's container, reaped
