"""One hardened container run on the local Docker Engine, through the docker SDK.

provision: resolve the image locally (never pull), make the /output area and
           the per-run cgroup, create the container locked down
execute:   attach to its logs, start it, keep our own clock; SIGTERM then
           SIGKILL on timeout or cancel, SIGKILL at once when /output is over quota
collect:   inspect, read the kernel's accounting, copy regular output files
deprovision: remove the container, the output area and the cgroup, always

Every container carries labels naming its owner process, so that containers
left behind by a crashed process are removed the next time a runner starts.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import posixpath
import re
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
import urllib3.exceptions
from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

from runners import messages
from runners.base import (
    FailureReason,
    ImageLoadFailed,
    ImageLoadTagged,
    ImageRejected,
    RunnerError,
    RunResult,
    RunSpec,
    RunStatus,
    failed,
    require_paths,
)
from runners.cgroups import (
    RUN_NAME,
    CgroupUsage,
    RunCgroup,
    leftover_run_cgroups,
    make_run_cgroup,
    remove_cgroup_tree,
)
from runners.image_tags import all_tags, put_back, tags_loaded
from runners.image_user import (
    MAX_ACCOUNT_FILE,
    MAX_ID,
    UserUnresolvable,
    numeric_pair,
    resolve_user,
)
from runners.log_stream import LogStream
from runners.logs import LogTail, shown
from runners.output_area import OutputArea, unmount

LABEL_MANAGED = "org.epreuve.managed"
LABEL_OWNER = "org.epreuve.owner"
LABEL_RUN = "org.epreuve.run"
RESERVED_LABELS = (LABEL_MANAGED, LABEL_OWNER, LABEL_RUN)  # what the reaper reads
REMAPPED_USER = "65534:65534"  # nobody:nogroup, for images whose user is root
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
WAIT_SLACK_SECONDS = 30.0
# How long a run waits for a daemon that went away to answer again (a restart) before it
# gives up: with --live-restore its container ran on meanwhile, and the run goes on.
DAEMON_RETURN_SECONDS = 60.0
OOM_PEAK_FRACTION = 0.9  # exit 137 with a peak this close to the limit is an OOM kill
# Start failures caused by the image rather than by the platform.
IMAGE_START_ERRORS = ("executable file not found", "no such file or directory",
                      "unable to find user", "permission denied", "exec format error",
                      "no command specified", "not a directory",
                      # runc setting up the image's working directory and environment
                      "cwd must be", "error during container init: mkdir ",
                      "error during container init: chdir ", "environment variable")
# The runs in flight in this process, whichever runner started them: they share the owner label.
_ACTIVE_RUNS: set[str] = set()
_ACTIVE_LOCK = threading.Lock()
RUN_OWNER_TAG = "owner"
IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")  # what intake pins and the workers run
ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}
MAX_VOLUMES = 16
# A VOLUME becomes a tmpfs; these paths are the sandbox's own or the kernel's.
FORBIDDEN_VOLUME_ROOTS = ("/input", "/output", "/proc", "/sys", "/dev")
SANDBOX_MOUNTS = ("/tmp",)  # already a tmpfs: an image VOLUME there is covered by it
NO_HEALTHCHECK = {"Test": ["NONE"]}  # an image's HEALTHCHECK would exec its own commands
ACCOUNT_FILES_RUN = "account-files"  # a container that is never started: no run, no path
GO_MODE_SYMLINK = 1 << 27  # os.ModeSymlink in the mode of Docker's path stat
# What the sandbox and Docker mount in every container (/dev is a fresh tmpfs: not the image's)
SANDBOX_DESTINATIONS = ("/input", "/output", "/tmp", "/etc/hosts", "/etc/hostname",
                        "/etc/resolv.conf")
SANDBOX_ROOTS = ("/input", "/output", "/tmp")
KERNEL_ROOTS = ("/proc", "/sys", "/dev")
MAX_LINK_HOPS = 40  # as the kernel


class DockerUnavailable(RunnerError, RuntimeError):
    """The Docker Engine did not answer."""

    exit_code = 3
    http_status = 503




class ImageAbsent(RuntimeError):
    """An image asked for by its id is not on this node: the platform pinned it, so it
    promised it (removed by an operator, or a node that never had it), not the team."""


class DaemonLost(RuntimeError):
    """The Docker Engine stopped answering in the middle of a run (restarted, crashed)."""


class ContainerVanished(RuntimeError):
    """The container was removed by someone other than the engine."""


class RunStuck(RuntimeError):
    """The container did not stop, even after SIGKILL."""


FINISHED_STATES = ("exited", "dead")
# None of them comes from the container itself, nor from the engine during a run: each is
# someone else changing the run (stopping it, its limits, its processes, its files).
OUTSIDE_ACTIONS = ("kill", "destroy", "pause", "update", "exec_create", "extract-to-dir")
DIE_EVENT_WAIT_SECONDS = 5.0  # the daemon reports `die` right after the exit it follows


@dataclass
class _Run:
    """The resources of one run, so that deprovision knows what to undo."""

    name: str
    directory: Path
    spec: RunSpec
    image: dict[str, Any] = field(default_factory=dict)
    user: str = REMAPPED_USER
    area: OutputArea | None = None
    cgroup: RunCgroup | None = None
    container_id: str | None = None
    logs: LogTail | None = None
    on_log: Callable[[str], None] | None = None  # the live log's receiver, if any


@dataclass
class _Execution:
    stop_reason: FailureReason | None = None
    leaf_oom_kills: int = 0
    sampled: CgroupUsage = field(default_factory=CgroupUsage)
    over_quota: bool = False
    # set once the engine itself asks the daemon to stop or kill: later kills are ours
    stopping: threading.Event = field(default_factory=threading.Event)
    outside_stop: str | None = None  # what stopped the container that the engine did not ask
    daemon_interrupted: bool = False  # the daemon went away while the container ran


class _Waiter(threading.Thread):
    """Blocks in the daemon's wait() for one container; records an error instead of an exit.

    A failed wait is never an exit: the main loop re-inspects the container and decides."""

    def __init__(self, api, cid: str, http_timeout: float, pause: float = 0.0):
        super().__init__(daemon=True, name="epreuve-wait")
        self.api, self.cid, self.http_timeout, self.pause = api, cid, http_timeout, pause
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            time.sleep(self.pause)  # a restart after an error: do not spin on a failing daemon
            while True:
                try:
                    self.api.wait(self.cid, timeout=self.http_timeout)
                    return
                except requests.exceptions.ReadTimeout:
                    continue  # only the HTTP timeout: the run limit is our own clock's
        except BaseException as exc:  # handed to the main loop, never lost
            self.error = exc
        finally:
            self.done.set()


class _EventWatcher(threading.Thread):
    """The daemon's events for one container: a `kill` the engine did not ask for is an
    outside stop (an operator's docker kill/stop/rm -f, a daemon shutting down). A process
    that kills itself inside the container makes no such event: that stays the team's."""

    def __init__(self, api, cid: str, execution: _Execution):
        super().__init__(daemon=True, name="epreuve-events")
        self.execution = execution
        self.died = threading.Event()
        # since: replay what happened between subscribing and the first read
        self.stream = api.events(since=f"{time.time() - 1:.9f}", decode=True,
                                 filters={"container": cid})

    def run(self) -> None:
        try:
            for event in self.stream:
                self._observe(event)
        except Exception:  # the stream ends with the daemon or with close()
            pass
        finally:
            self.died.set()

    def _observe(self, event: dict) -> None:
        action = (event.get("Action") or event.get("status") or "").split(":")[0].strip()
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        ours = self.execution.stopping.is_set()
        if action in OUTSIDE_ACTIONS and not ours and self.execution.outside_stop is None:
            detail = f" {attributes['signal']}" if "signal" in attributes else ""
            self.execution.outside_stop = f"{action}{detail}"
        if action == "die":
            self.died.set()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stream.close()


class DockerRunner:
    """The `Runner` for a Docker Engine on this host (cgroup accounting needs the local kernel)."""

    def __init__(
        self,
        base_url: str | None = None,
        *,
        state_dir: Path | None = None,
        poll_interval: float = 0.1,
        use_cgroups: bool = True,
        reap_orphans: bool = True,
        daemon_return_seconds: float = DAEMON_RETURN_SECONDS,
    ):
        # Explicit daemon: docker.from_env() would follow the CLI's current context.
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET
        try:
            self.client = docker.DockerClient(base_url=self.base_url, timeout=120)
            info = self.client.api.info()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(
                f"no Docker Engine answers at {self.base_url}: {exc}. "
                "Start one (scripts/ensure-docker) or set DOCKER_HOST."
            ) from exc
        self.api = self.client.api
        self.state_dir = Path(state_dir or default_state_dir())
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.poll_interval = poll_interval
        self.daemon_return_seconds = daemon_return_seconds
        self.cgroup_version = int(info.get("CgroupVersion") or 1)
        self.cgroup_driver = info.get("CgroupDriver")
        self.node_arch = ARCH_ALIASES.get(info.get("Architecture", ""), info.get("Architecture"))
        self.use_cgroups = use_cgroups
        self.owner = owner_token()
        self._leftovers = False  # a container we could not remove: retry before the next run
        self._mounts_checked: set[str] = set()  # image ids whose mount paths are no links
        if reap_orphans:
            self.reap_orphans()

    # -- the Runner protocol -------------------------------------------------------------

    def run(self, spec: RunSpec, cancel: threading.Event | None = None, *,
            on_log: Callable[[str], None] | None = None) -> RunResult:
        """`on_log` receives the log while the container runs (runners/log_stream.py)."""
        require_paths(spec)  # InvalidRunSpec: refused before anything is created
        if self._leftovers:
            self._reap_quietly()
        name = f"epreuve-{uuid.uuid4().hex[:12]}"
        run = _Run(name=name, directory=self.state_dir / name, spec=spec, on_log=on_log)
        with _ACTIVE_LOCK:
            _ACTIVE_RUNS.add(name)
        try:
            return self._run(run, cancel)
        finally:
            self._deprovision(run)
            with _ACTIVE_LOCK:
                _ACTIVE_RUNS.discard(name)

    def _run(self, run: _Run, cancel: threading.Event | None) -> RunResult:
        """Never raises: whatever goes wrong on the platform's side is INFRASTRUCTURE."""
        image_id = None
        try:
            self._provision(run)
            image_id = run.image.get("Id")
            execution = self._execute(run, cancel)
            return self._collect(run, execution)
        except ImageRejected as exc:
            return failed(FailureReason.IMAGE_INVALID, str(exc), image_id=run.image.get("Id"))
        except ImageAbsent as exc:
            return failed(FailureReason.INFRASTRUCTURE, messages.image_absent(), detail=str(exc))
        except Exception as exc:  # the daemon, the host, a bug of ours: never the team's fault
            return self._platform_failure(run, exc, image_id)

    def _platform_failure(self, run: _Run, exc: BaseException, image_id: str | None) -> RunResult:
        return failed(FailureReason.INFRASTRUCTURE, messages.infrastructure(exc),
                      image_id=image_id, log_tail=run.logs.text() if run.logs else "",
                      detail=shown("".join(traceback.format_exception(exc))))

    # -- provision -----------------------------------------------------------------------

    def _provision(self, run: _Run) -> None:
        run.image = self.resolve_image(run.spec.image, run.spec.command)
        run.user = effective_user(run.spec.user, run.image["Config"].get("User") or "",
                                  lambda: self.account_files(run.image))
        self.check_mount_paths(run.image)
        run.directory.mkdir(mode=0o700)
        (run.directory / RUN_OWNER_TAG).write_text(self.owner)  # for a reap without container
        run.area = OutputArea.create(run.directory / "output", run.spec.output_quota_bytes)
        if self.use_cgroups:
            run.cgroup = make_run_cgroup(run.name, version=self.cgroup_version,
                                         driver=self.cgroup_driver)
        input_dir = run.spec.input_dir
        if input_dir is None:  # the contract holds even with nothing to read
            input_dir = run.directory / "empty-input"
            input_dir.mkdir()
        run.container_id = self._create_container(run, Path(input_dir))

    def inspect_image(self, reference: str) -> dict:
        """The Runner protocol's view of an image: `resolve_image` with its own command."""
        return self.resolve_image(reference)

    def has_image(self, image_id: str) -> bool:
        """The daemon holds exactly this id (a tag or a short id never counts)."""
        if not IMAGE_ID.fullmatch(image_id):
            return False
        try:
            return self.api.inspect_image(image_id).get("Id") == image_id
        except docker.errors.ImageNotFound:
            return False
        except requests.exceptions.ConnectionError as exc:
            raise DockerUnavailable(f"no Docker Engine answers at {self.base_url}: "
                                    f"{exc}") from exc

    def answers(self) -> bool:
        try:
            self.api.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return False
        return True

    def load_image(self, chunks: Iterable[bytes]) -> None:
        """`docker load`, the archive streamed as the request body. The daemon's answer is
        read to its end (it reports a refusal there, after a 200); a tag the load set is
        put back where it was and the load refused."""
        before = all_tags(self.api)
        try:
            answer = list(self.api.load_image(chunks, quiet=True))
        except docker.errors.APIError as exc:
            raise ImageLoadFailed(f"the Docker Engine refused the archive: "
                                  f"{exc.explanation or exc}") from None
        except requests.exceptions.RequestException as exc:
            raise ImageLoadFailed(f"the archive could not be sent to the Docker Engine: "
                                  f"{exc}") from None
        refusals = [str(m.get("error") or m.get("errorDetail")) for m in answer
                    if isinstance(m, dict) and (m.get("error") or m.get("errorDetail"))]
        if refusals:
            raise ImageLoadFailed(f"the Docker Engine refused the archive: {refusals[0]}")
        tagged = tags_loaded(answer)
        for tag in tagged:
            put_back(self.api, tag, before.get(tag))
        if tagged:
            raise ImageLoadTagged(f"the archive set the node's tags {tagged[:8]} (put back)")

    def resolve_image(self, reference: str, command: tuple[str, ...] | None = None) -> dict:
        """The image's attributes, from this node only: a missing image is refused, not pulled."""
        try:
            image = self.api.inspect_image(reference)
        except docker.errors.APIError as exc:
            if not isinstance(exc, docker.errors.ImageNotFound) and exc.status_code not in (
                    400, 404):
                raise
            if IMAGE_ID.fullmatch(reference):
                raise ImageAbsent(f"the pinned image {reference} is not on this node") from None
            raise ImageRejected(messages.image_missing(reference)) from None
        arch = image.get("Architecture")
        if self.node_arch and arch and arch != self.node_arch:
            raise ImageRejected(messages.image_wrong_arch(arch, self.node_arch))
        config = image.get("Config") or {}
        if not command and not (config.get("Entrypoint") or config.get("Cmd")):
            raise ImageRejected(messages.image_without_command())
        image_volumes(image)  # refused here, before anything is created
        problem = image_settings_problem(config)
        if problem is not None:
            raise ImageRejected(messages.image_cannot_start(problem))
        return image

    def account_files(self, image: dict) -> tuple[str | None, str | None]:
        """The image's own /etc/passwd and /etc/group (None where absent)."""
        with self._unstarted(image) as cid:
            return (self._read_account_file(cid, "/etc/passwd"),
                    self._read_account_file(cid, "/etc/group"))

    def check_mount_paths(self, image: dict) -> None:
        """Refuse an image whose links lead a path the sandbox mounts (/input, /output, /tmp,
        the files Docker provides, each VOLUME) somewhere else that matters: Docker mounts
        where the links lead, so over /output, over /, or into /proc, where runc then refuses
        to start (which would pass for the platform's fault). A link to an ordinary place
        (/etc/resolv.conf to /run/...) is left alone. An image's content never changes
        under its id: each id is checked once."""
        if image["Id"] in self._mounts_checked:
            return
        with self._unstarted(image) as cid:
            for destination in [*SANDBOX_DESTINATIONS, *image_volumes(image)]:
                landing = self._resolved(cid, destination)
                if _lands_badly(destination, landing):
                    raise ImageRejected(messages.image_cannot_start(
                        f"the image's symbolic links lead {destination}, which the sandbox "
                        f"mounts, to {landing}: make {destination} a directory of the "
                        "image (or remove it)"))
        self._mounts_checked.add(image["Id"])

    def _resolved(self, cid: str, path: str) -> str:
        """`path` with the image's links followed, as Docker follows them to mount there.
        Docker's stat gives a link's target already resolved in the container's root."""
        for _ in range(MAX_LINK_HOPS):
            for prefix in _prefixes(path):
                stat = self._path_stat(cid, prefix)
                if stat is None:
                    return path  # absent from here on: Docker makes it
                if stat.get("linkTarget") or int(stat.get("mode") or 0) & GO_MODE_SYMLINK:
                    target = clean_path(stat.get("linkTarget") or "/")
                    path = clean_path(target + path[len(prefix):])
                    break
            else:
                return path
        raise ImageRejected(messages.image_cannot_start(
            f"the image's symbolic links lead {path} through more than {MAX_LINK_HOPS} links"))

    @contextlib.contextmanager
    def _unstarted(self, image: dict):
        """A container of `image`, created, never started, removed at once: to read it. It
        counts as a run in flight of this process, so that no reaper (another runner of this
        same process included) removes it while it is read."""
        name = f"{ACCOUNT_FILES_RUN}-{uuid.uuid4().hex[:12]}"  # no path: RUN_NAME never matches
        with _ACTIVE_LOCK:
            _ACTIVE_RUNS.add(name)
        try:
            container = self.api.create_container(
                image=image["Id"], entrypoint=["/nonexistent"], command=[],
                network_disabled=True, labels=self._labels({}, name),
                healthcheck=NO_HEALTHCHECK, host_config=self.api.create_host_config(
                    network_mode="none", read_only=True,
                    tmpfs={path: "rw,nosuid,nodev,size=1m" for path in image_volumes(image)}))
            try:
                yield container["Id"]
            finally:
                self._remove_container(container["Id"])
        finally:
            with _ACTIVE_LOCK:
                _ACTIVE_RUNS.discard(name)

    def _path_stat(self, cid: str, path: str) -> dict | None:
        """Docker's stat of `path` in the container, the last component not followed."""
        response = self.api.head(self.api._url("/containers/{0}/archive", cid),
                                 params={"path": path})
        if response.status_code == 404:
            return None
        self.api._raise_for_status(response)
        header = response.headers.get("X-Docker-Container-Path-Stat") or ""
        return json.loads(base64.b64decode(header)) if header else None

    def _read_account_file(self, cid: str, path: str) -> str | None:
        try:
            chunks, _ = self.api.get_archive(cid, path)
        except docker.errors.NotFound:
            return None
        data = b""
        for chunk in chunks:
            data += chunk
            if len(data) > MAX_ACCOUNT_FILE + (64 << 10):
                raise ImageRejected(messages.image_cannot_start(
                    f"{path} is larger than {MAX_ACCOUNT_FILE} bytes"))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.next()
            if member is None or not member.isreg():
                raise ImageRejected(messages.image_cannot_start(
                    f"{path} is not a regular file, so USER cannot be resolved: use USER "
                    "uid:gid with numbers"))
            return tar.extractfile(member).read().decode("utf-8", "replace")

    def _create_container(self, run: _Run, input_dir: Path) -> str:
        spec = run.spec
        host_config = self.api.create_host_config(**sandbox_host_config(
            spec, input_dir=input_dir, output_dir=run.area.path,
            cgroup_parent=run.cgroup.parent if run.cgroup else None,
            volumes=image_volumes(run.image),
        ))
        labels = self._labels(spec.labels, run.name)
        try:
            container = self.api.create_container(
                image=run.image["Id"],  # by id: create never pulls, and the tag cannot move
                command=list(spec.command) if spec.command else None,
                environment=container_env(spec),
                user=run.user,
                labels=labels,
                name=run.name,
                hostname="epreuve",
                network_disabled=True,
                stop_signal="SIGTERM",
                healthcheck=NO_HEALTHCHECK,  # only our command runs in the sandbox
                host_config=host_config,
            )
        except docker.errors.APIError as exc:
            raise _classify_api_error(exc) from exc
        return container["Id"]

    def _labels(self, requested: dict[str, str], run_name: str) -> dict[str, str]:
        """Every label the reaper reads, set by us: Docker adds the image's LABELs to the
        container's, so a key we left unset would be the participant's to choose."""
        return {**requested, LABEL_MANAGED: "true", LABEL_OWNER: self.owner,
                LABEL_RUN: run_name}

    # -- execute -------------------------------------------------------------------------

    def _execute(self, run: _Run, cancel: threading.Event | None) -> _Execution:
        spec, cid = run.spec, run.container_id
        live = LogStream(run.on_log).start() if run.on_log else None
        run.logs = LogTail(spec.log_cap_bytes, listener=live.feed if live else None)
        run.logs.follow(self.api.attach(cid, stdout=True, stderr=True, stream=True, logs=False))
        execution = _Execution()
        watcher = _EventWatcher(self.api, cid, execution)
        watcher.start()
        try:
            try:
                self.api.start(cid)
            except docker.errors.APIError as exc:
                raise _classify_api_error(exc) from exc
            self._supervise(run, cancel, execution)
            watcher.died.wait(DIE_EVENT_WAIT_SECONDS)  # the events up to the exit are read
        finally:
            watcher.close()
            if live is not None:
                run.logs.join(timeout=2)  # the last lines, before the final chunk is sent
                live.close()
        execution.over_quota = run.area.over_quota()
        return execution

    def _supervise(self, run: _Run, cancel: threading.Event | None,
                   execution: _Execution) -> None:
        """Our own clock until the container has really exited; our stops are recorded."""
        spec, cid = run.spec, run.container_id
        http_timeout = spec.timeout_seconds + spec.stop_grace_seconds + 60
        waiter = _Waiter(self.api, cid, http_timeout)
        waiter.start()
        deadline = time.monotonic() + spec.timeout_seconds
        must_exit_by: float | None = None  # after our stop: when to escalate
        killed = False
        next_sample = 0.0
        while True:
            if waiter.done.wait(self.poll_interval):
                if self._has_exited(cid, waiter, execution):
                    return
                waiter = _Waiter(self.api, cid, http_timeout, pause=self.poll_interval)
                waiter.start()
                continue
            next_sample = self._account(run, execution, next_sample)
            now = time.monotonic()
            if must_exit_by is None:
                reason = self._reason_to_stop(run, cancel, deadline, now)
                if reason is not None:
                    execution.stop_reason = reason
                    execution.stopping.set()
                    if reason is FailureReason.OUTPUT_QUOTA:
                        self._kill(cid)
                    else:
                        self._stop(cid, spec.stop_grace_seconds)
                    must_exit_by = now + spec.stop_grace_seconds + WAIT_SLACK_SECONDS
            elif now >= must_exit_by and not killed:
                self._kill(cid)
                killed, must_exit_by = True, now + WAIT_SLACK_SECONDS
            elif now >= must_exit_by:
                raise RunStuck(f"container {cid[:12]} did not stop after SIGKILL")

    def _reason_to_stop(self, run: _Run, cancel: threading.Event | None, deadline: float,
                        now: float) -> FailureReason | None:
        if run.area.over_quota():
            return FailureReason.OUTPUT_QUOTA
        if cancel is not None and cancel.is_set():
            return FailureReason.CANCELLED
        if now >= deadline:
            return FailureReason.TIMEOUT
        return None

    def _account(self, run: _Run, execution: _Execution, next_sample: float) -> float:
        if run.cgroup is not None:
            kills = run.cgroup.read_leaf_oom_kills(run.container_id) or 0
            execution.leaf_oom_kills = max(execution.leaf_oom_kills, kills)
        elif time.monotonic() >= next_sample:
            self._sample_stats(run.container_id, execution.sampled)
            return time.monotonic() + 1.0
        return next_sample

    def _has_exited(self, cid: str, waiter: _Waiter, execution: _Execution) -> bool:
        """After wait() returned or failed: has the container really exited?"""
        if waiter.error is None:
            return True
        if _is_connection_error(waiter.error):
            execution.daemon_interrupted = True
            state = self._state_once_back(cid)
        else:
            state = self._state(cid)
        if state.get("Status") in FINISHED_STATES:
            return True
        if _is_connection_error(waiter.error):
            execution.daemon_interrupted = False  # back, and the container still runs
        return False

    def _state_once_back(self, cid: str) -> dict:
        """The container's state once the daemon answers again (a restart takes seconds);
        DaemonLost when it stays away past `daemon_return_seconds`."""
        give_up_at = time.monotonic() + self.daemon_return_seconds
        while True:
            try:
                return self._state(cid)
            except DaemonLost:
                if time.monotonic() >= give_up_at:
                    raise
            time.sleep(max(self.poll_interval, 0.5))

    def _state(self, cid: str) -> dict:
        try:
            return self.api.inspect_container(cid)["State"]
        except docker.errors.NotFound:
            raise ContainerVanished(f"container {cid[:12]} was removed from outside the "
                                    "engine during the run") from None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DaemonLost(f"the Docker Engine stopped answering during the run: "
                             f"{type(exc).__name__}") from exc

    def _stop(self, cid: str, grace: float) -> None:
        with contextlib.suppress(docker.errors.APIError, requests.exceptions.RequestException):
            self.api.stop(cid, timeout=max(0, round(grace)))

    def _kill(self, cid: str) -> None:
        with contextlib.suppress(docker.errors.APIError, requests.exceptions.RequestException):
            self.api.kill(cid, signal="SIGKILL")

    def _sample_stats(self, cid: str, usage: CgroupUsage) -> None:
        """Accounting without cgroup access: samples of the stats API, a lower bound."""
        try:
            stats = self.api.stats(cid, stream=False, one_shot=True)
        except (docker.errors.APIError, requests.exceptions.RequestException):
            return
        memory = stats.get("memory_stats") or {}
        peak = memory.get("max_usage") or memory.get("usage")
        if peak:
            usage.peak_memory_bytes = max(usage.peak_memory_bytes or 0, int(peak))
        total = ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage")
        if total:
            usage.cpu_seconds = max(usage.cpu_seconds or 0.0, total / 1e9)

    # -- collect -------------------------------------------------------------------------

    def _collect(self, run: _Run, execution: _Execution) -> RunResult:
        spec = run.spec
        state = self._state(run.container_id)
        if state.get("Status") not in FINISHED_STATES:  # never an exit code of a live container
            raise DaemonLost(f"the Docker Engine reported an exit, but the container is "
                             f"{state.get('Status')!r}")
        started, finished = parse_docker_time(state.get("StartedAt")), parse_docker_time(
            state.get("FinishedAt"))
        usage = run.cgroup.read() if run.cgroup else execution.sampled
        run.logs.join(timeout=10)
        collected = run.area.collect(Path(spec.output_dir) if spec.output_dir else None)
        exit_code = state.get("ExitCode")
        oom_kills = max(usage.oom_kills or 0, execution.leaf_oom_kills)
        outside = _outside_stop(execution)
        reason = decide_reason(
            stop_reason=execution.stop_reason,
            over_quota=execution.over_quota
            or collected.reason is FailureReason.OUTPUT_QUOTA,
            exit_code=exit_code,
            oom_evidence=bool(state.get("OOMKilled")) or oom_kills > 0
            or _peak_at_limit(exit_code, usage.peak_memory_bytes, spec.memory_bytes),
            outside_stop=outside is not None,
        ) or collected.reason  # what collection refused (bad names, depth): the team's fault
        if reason is FailureReason.INFRASTRUCTURE:
            message = messages.stopped_from_outside()
        elif reason is collected.reason and not execution.over_quota and collected.message:
            message = collected.message
        else:
            message = messages.for_reason(reason, spec, exit_code, usage.peak_memory_bytes)
        return RunResult(
            status=RunStatus.SUCCEEDED if reason is None else RunStatus.FAILED,
            reason=reason,
            message=message,
            detail=outside or "",
            exit_code=exit_code,
            started_at=started,
            finished_at=finished,
            wall_seconds=wall_seconds(started, finished),
            cpu_seconds=usage.cpu_seconds,
            peak_memory_bytes=usage.peak_memory_bytes,
            oom_kills=oom_kills,
            peak_pids=usage.peak_pids,
            output_bytes=collected.bytes,
            output_files=collected.files,
            skipped_outputs=collected.skipped,
            log_tail=run.logs.text(),
            log_bytes=run.logs.total_bytes,
            log_truncated=run.logs.truncated,
            image_id=run.image.get("Id"),
            user=run.user,
            accounting=run.cgroup.label if run.cgroup else "sampled",
        )

    # -- deprovision ---------------------------------------------------------------------

    def _deprovision(self, run: _Run) -> None:
        """Undo what provision did; never raises. What cannot be undone now (the daemon is
        away) is undone by the next reap: the container stays labelled with its run."""
        removed = run.container_id is None or self._remove_container(run.container_id)
        if run.area is not None:
            with contextlib.suppress(OSError):
                run.area.release()
        if run.cgroup is not None and removed:
            run.cgroup.remove()
        shutil.rmtree(run.directory, ignore_errors=True)

    def _remove_container(self, cid: str) -> bool:
        """True when the container is gone; False (remembered for a later reap) otherwise."""
        try:
            self.api.remove_container(cid, force=True, v=True)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            self._leftovers = True
            return False
        return True

    def _reap_quietly(self) -> None:
        # still away: the flag stays set, and the next run tries again
        with contextlib.suppress(docker.errors.DockerException,
                                 requests.exceptions.RequestException):
            self.reap_orphans()

    def reap_orphans(self) -> list[str]:
        """Remove what runs that are over left behind: containers, output areas and cgroups of
        dead runner processes, and of this one's finished runs (a daemon that was away).
        Raises only when the daemon does not answer the listing."""
        reaped, known = [], set()
        containers = self.api.containers(all=True, filters={"label": LABEL_MANAGED})
        self._leftovers = False
        for container in containers:
            labels = container.get("Labels") or {}
            run_name = labels.get(LABEL_RUN, "")
            known.add(run_name)
            if not self._is_leftover(labels.get(LABEL_OWNER, ""), run_name):
                continue
            if self._remove_container(container["Id"]):
                self._release_run(run_name)
                reaped.append(container["Id"])
        self._remove_orphan_run_dirs(known)
        self._remove_orphan_cgroups(known)
        return reaped

    def _remove_orphan_run_dirs(self, containers_known: set[str]) -> None:
        """Output areas of dead runs whose container is already gone (another node's runner
        reaped it first, or the process died before creating it)."""
        for run_dir in self.state_dir.iterdir() if self.state_dir.is_dir() else ():
            if not RUN_NAME.fullmatch(run_dir.name) or run_dir.name in containers_known:
                continue
            try:
                owner = (run_dir / RUN_OWNER_TAG).read_text()
            except OSError:
                continue  # untagged: being provisioned right now
            if self._is_leftover(owner, run_dir.name):
                self._release_run(run_dir.name)

    def _is_leftover(self, owner: str, run_name: str) -> bool:
        if owner == self.owner:
            with _ACTIVE_LOCK:
                return run_name not in _ACTIVE_RUNS
        return not owner_alive(owner)

    def _release_run(self, run_name: str) -> None:
        if not RUN_NAME.fullmatch(run_name):
            return  # a label is not trusted with a path
        run_dir = self.state_dir / run_name
        unmount(run_dir / "output")
        shutil.rmtree(run_dir, ignore_errors=True)
        cgroup = make_run_cgroup(run_name, version=self.cgroup_version, driver=self.cgroup_driver)
        if cgroup is not None:
            cgroup.remove()

    def _remove_orphan_cgroups(self, containers_known: set[str]) -> None:
        """Per-run cgroups whose container is gone (a worker killed between the two removals).
        Only empty groups can be removed, so a group still in use elsewhere stays."""
        with _ACTIVE_LOCK:
            busy = containers_known | _ACTIVE_RUNS
        for run_name, paths in leftover_run_cgroups().items():
            if run_name not in busy:
                for path in paths:
                    remove_cgroup_tree(path)


# -- pure helpers (tested without a daemon) -------------------------------------------------


def sandbox_host_config(spec: RunSpec, *, input_dir: Path, output_dir: Path,
                        cgroup_parent: str | None, volumes: tuple[str, ...] | list[str] = (),
                        ) -> dict[str, Any]:
    """The sandbox, as arguments of `APIClient.create_host_config`: one definition for all.
    Every VOLUME of the image is covered by a tmpfs of the /tmp size (charged to memory, like
    /tmp): Docker would otherwise make it a writable, unlimited directory on its own disk."""
    tmpfs = {"/tmp": f"rw,nosuid,nodev,size={spec.tmp_size_bytes}"}
    for path in volumes:
        tmpfs.setdefault(path, f"rw,nosuid,nodev,size={spec.tmp_size_bytes}")
    config: dict[str, Any] = dict(
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],  # default seccomp stays on: never 'unconfined'
        privileged=False,
        read_only=True,
        init=True,  # a real PID 1 that forwards SIGTERM and reaps zombies
        ipc_mode="private",
        tmpfs=tmpfs,
        pids_limit=spec.pids_limit,
        mem_limit=spec.memory_bytes,
        memswap_limit=spec.memory_bytes,  # equal: no swap
        nano_cpus=int(spec.cpus * 1e9),
        shm_size=spec.shm_size_bytes,
        ulimits=[Ulimit(name="nofile", soft=spec.nofile, hard=spec.nofile),
                 Ulimit(name="core", soft=0, hard=0)],
        log_config=LogConfig(type="json-file",
                             config={"max-size": str(spec.log_cap_bytes), "max-file": "1"}),
        mounts=[
            Mount(target="/input", source=str(Path(input_dir).resolve()), type="bind",
                  read_only=True, propagation="rprivate"),
            Mount(target="/output", source=str(output_dir), type="bind", read_only=False,
                  propagation="rprivate"),
        ],
    )
    if spec.gpu_uuids:
        config["device_requests"] = [
            DeviceRequest(driver="nvidia", device_ids=list(spec.gpu_uuids), capabilities=[["gpu"]])
        ]
    if cgroup_parent:
        config["cgroup_parent"] = cgroup_parent
    return config


def container_env(spec: RunSpec) -> dict[str, str]:
    """The spec's environment, with NVIDIA_VISIBLE_DEVICES always set by us: the allocated
    UUIDs, or `void`. An image's own `=all` would otherwise hand it every GPU of the node."""
    env = dict(spec.env)
    env["NVIDIA_VISIBLE_DEVICES"] = ",".join(spec.gpu_uuids) if spec.gpu_uuids else "void"
    return env


def decide_reason(*, stop_reason: FailureReason | None, over_quota: bool, exit_code: int | None,
                  oom_evidence: bool, outside_stop: bool = False) -> FailureReason | None:
    """The one typed reason of a finished run; None when it succeeded.

    A stop nobody in the engine asked for (an operator's kill or pause, a daemon restart) is
    recorded only before any stop of ours, so it comes first: a paused container that then
    timed out is the platform's fault. Only the output quota is the team's regardless."""
    if stop_reason is FailureReason.OUTPUT_QUOTA or over_quota:
        return FailureReason.OUTPUT_QUOTA
    if outside_stop:
        return FailureReason.INFRASTRUCTURE
    if stop_reason is not None:
        return stop_reason
    if exit_code != 0 and oom_evidence:
        return FailureReason.OOM_KILLED
    if exit_code != 0:
        return FailureReason.NONZERO_EXIT
    return None


def _peak_at_limit(exit_code: int | None, peak: int | None, limit: int) -> bool:
    # State.OOMKilled misses kills of child processes on cgroup v2: the peak does not.
    return exit_code == 137 and peak is not None and peak >= OOM_PEAK_FRACTION * limit


def _lands_badly(destination: str, landing: str) -> bool:
    """A mount at `landing` in place of `destination`: over the root, into a kernel file
    system, or over another of the sandbox's own mounts."""
    def within(path: str, roots: tuple[str, ...]) -> bool:
        return any(path == root or path.startswith(root + "/") for root in roots)

    if landing == destination:
        return False
    return landing == "/" or within(landing, KERNEL_ROOTS) or within(landing, SANDBOX_ROOTS)


def _prefixes(path: str) -> list[str]:
    """`/a/b/c` -> `/a`, `/a/b`, `/a/b/c`."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:end]) for end in range(1, len(parts) + 1)]


def clean_path(path: str) -> str:
    """An absolute path as Docker cleans it (Go's filepath.Clean): POSIX's normpath keeps a
    leading `//`, Docker does not, so `//data` would be another path to us than to it."""
    return "/" + posixpath.normpath(path).lstrip("/")


def image_volumes(image: dict) -> list[str]:
    """The image's VOLUMEs, cleaned as Docker cleans them; a path the sandbox mounts itself
    (/input, /output) or a kernel file system is refused."""
    volumes = (image.get("Config") or {}).get("Volumes") or {}
    if not isinstance(volumes, dict) or len(volumes) > MAX_VOLUMES:
        raise ImageRejected(messages.image_cannot_start(
            f"the image declares more than {MAX_VOLUMES} VOLUMEs"))
    cleaned = []
    for path in volumes:
        clean = cleaned_volume(path)
        if clean is None:
            raise ImageRejected(messages.image_cannot_start(
                f"VOLUME {path!r} is not allowed: volumes must be absolute paths outside /, "
                "/input, /output, /proc, /sys and /dev"))
        if clean not in SANDBOX_MOUNTS:
            cleaned.append(clean)
    return cleaned


def cleaned_volume(path: str) -> str | None:
    """A VOLUME path as Docker cleans it; None for one the sandbox cannot cover with a tmpfs
    (relative, /, or a path the sandbox mounts itself or a kernel file system). The one
    volume policy: image intake applies it too."""
    clean = clean_path(path) if isinstance(path, str) and path.startswith("/") else ""
    if clean in ("", "/", "//") or any(clean == root or clean.startswith(root + "/")
                                       for root in FORBIDDEN_VOLUME_ROOTS):
        return None
    return clean


def image_settings_problem(config: dict) -> str | None:
    """What in an image's WorkingDir or Env the runtime would refuse at start, or None.
    Refused before the run, so that an image cannot pass its own failure to start for the
    platform's (INFRASTRUCTURE is retried and never counted against the team)."""
    return (_working_dir_problem(config.get("WorkingDir")) or _env_problem(config.get("Env"))
            or _labels_problem(config.get("Labels")))


def _labels_problem(labels: Any) -> str | None:
    """Docker copies an image's LABELs onto every container made from it, by anyone: one
    naming an owner and a run would send the reaper after containers and run directories
    that are not the image's."""
    if labels is None:
        return None
    if not isinstance(labels, dict):
        return "the image's Labels is not an object"
    reserved = sorted(set(labels) & set(RESERVED_LABELS))
    if reserved:
        return f"the image sets the labels {reserved}, which are the platform's own"
    return None


def _working_dir_problem(working_dir: Any) -> str | None:
    if working_dir in (None, ""):
        return None
    if not isinstance(working_dir, str) or "\0" in working_dir:
        return "the image's WorkingDir is not a path"
    if not working_dir.startswith("/"):
        return f"the image's WorkingDir {working_dir!r} is not an absolute path"
    clean = clean_path(working_dir)
    for root in FORBIDDEN_VOLUME_ROOTS:  # mounted by the sandbox or the kernel: read-only
        if clean.startswith(root + "/"):
            return (f"the image's WorkingDir {working_dir!r} lies inside {root}, which the "
                    "sandbox mounts itself: use a directory of the image, e.g. WORKDIR /app")
    return None


def _env_problem(env: Any) -> str | None:
    if env is None:
        return None
    if not isinstance(env, list) or not all(isinstance(item, str) for item in env):
        return "the image's Env is not a list of strings"
    for item in env:
        name = item.partition("=")[0]
        if not name or "\0" in item:
            return (f"the image's environment variable {item[:80]!r} has an empty name or a "
                    "NUL character")
    return None


def effective_user(requested: str | None, image_user: str,
                   account_files: Any = None) -> str:
    """The numbers the container runs as, `uid:gid`: never root. A name is resolved through
    the image's own /etc/passwd and /etc/group (`account_files()` reads them) as runc would,
    so that `toor` or `00` cannot pass for a non-root user. uid 0 becomes nobody:nogroup,
    gid 0 becomes nogroup; the numbers are passed explicitly, so runc adds no supplementary
    group either."""
    spec = (requested or image_user or "").strip()
    if not spec:
        return REMAPPED_USER
    pair = numeric_pair(spec)
    if pair is None:
        passwd, group = account_files() if account_files is not None else (None, None)
        try:
            resolved = resolve_user(spec, passwd, group)
        except UserUnresolvable as exc:
            raise ImageRejected(messages.image_cannot_start(str(exc))) from None
        pair = (resolved.uid, resolved.gid)
    uid, gid = pair
    if not (0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID):
        raise ImageRejected(messages.image_cannot_start(f"the user {spec!r} is out of range"))
    if uid == 0:
        return REMAPPED_USER
    return f"{uid}:{65534 if gid == 0 else gid}"


def _outside_stop(execution: _Execution) -> str | None:
    """What stopped the container from outside the engine, for organisers; None if nothing."""
    if execution.daemon_interrupted:
        return "the Docker Engine went away while the container ran"
    if execution.outside_stop is not None:
        return f"the daemon reported `{execution.outside_stop}` that the engine did not ask for"
    return None


def _is_connection_error(exc: BaseException) -> bool:
    """The daemon itself is unreachable (as opposed to an error answer from it)."""
    return isinstance(exc, requests.exceptions.ConnectionError | urllib3.exceptions.ProtocolError
                      | ConnectionError | requests.exceptions.ChunkedEncodingError)


def _classify_api_error(exc: docker.errors.APIError) -> Exception:
    text = str(exc.explanation or exc).lower()
    if any(hint in text for hint in IMAGE_START_ERRORS):
        return ImageRejected(messages.image_cannot_start(str(exc.explanation or exc)))
    return exc


def parse_docker_time(value: str | None) -> datetime | None:
    """RFC 3339 with nanoseconds, as the daemon writes it; None for its zero time."""
    if not value or value.startswith("0001-"):
        return None
    match = re.fullmatch(r"(.+T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", value)
    if not match:
        return None
    fraction = (match.group(2) or ".0")[:7]
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    return datetime.fromisoformat(f"{match.group(1)}{fraction}{zone}")


def default_state_dir() -> Path:
    configured = os.environ.get("EPREUVE_STATE_DIR")
    if configured:
        return Path(configured) / "runs"
    if os.geteuid() == 0:
        return Path("/var/lib/epreuve/runs")
    return Path(tempfile.gettempdir()) / f"epreuve-{os.geteuid()}" / "runs"


def wall_seconds(started: datetime | None, finished: datetime | None) -> float | None:
    """The daemon's own timestamps; it records StartedAt late, so an instant exit can precede it."""
    if started is None or finished is None:
        return None
    return max(0.0, (finished - started).total_seconds())


def _process_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks


def owner_token(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start_time(pid) or '?'}"


def owner_alive(token: str) -> bool:
    """False only when we can tell the owning process on this host is gone."""
    host, _, rest = token.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return host != socket.gethostname()  # another host's run is not ours to judge
    current = _process_start_time(int(pid_text))
    return current is not None and (start == "?" or current == start)
