"""What a reviewer needs to reproduce a run, recorded as plain JSON-able data.

Two parts: the node's facts (the engine's version and commit, the Docker Engine, the
kernel, the GPUs), collected once per process since they do not change from job to job,
and the job's own (the pinned image, the sealed dataset, the challenge definition, the
exact RunSpec, the start and end, the outputs' hashes). `job_provenance` joins them into
the record kept in the job's run_result. docs/provenance.md lists every field.

Everything here is data in, data out, except the collectors of node facts (`node_facts`,
`engine_facts`), which ask Docker, git and NVML, each with a fallback of None or [].

The record (`job_provenance`), field by field:

    field                          from
    -----------------------------  --------------------------------------------------------
    format                         PROVENANCE_FORMAT: bumped when a field changes meaning
    image.image_id                 ImageRow.image_id: the config digest containers start from
    image.tar_sha256               ImageRow.tar_sha256: the submitted archive's bytes
    image.layers                   ImageRow.layers: the RootFS diff ids
    dataset.version                PhaseRow.dataset_version: sealed when the phase was made
    dataset.manifest_sha256        SealedDataset.version verified for this run (same hash)
    dataset.case_ids               the job's shard of cases
    challenge.id, .phase           ChallengeRow.id, PhaseRow.slug
    challenge.definition_sha256    ChallengeRow.definition_sha256
    run_spec.*                     the RunSpec, every field: limits, user, gpu_uuids, env...
    ran.image_id, ran.user         RunResult: the image and user the container really had
    engine.version                 importlib.metadata.version("epreuve")
    engine.commit, engine.dirty    git rev-parse HEAD / status in a checkout, else the
                                   BUILD_COMMIT file written when packaged, else None
    docker.server_version ...      docker info: ServerVersion, KernelVersion (kernel),
                                   OperatingSystem, OSType, Architecture, DefaultRuntime,
                                   Runtimes (name -> path), CgroupVersion, CgroupDriver,
                                   SecurityOptions, Name
    gpus[]                         gpu.inventory (NVML), for the spec's GPU UUIDs: uuid,
                                   index, model, memory_bytes, driver_version, cuda_version
    node_name                      socket.gethostname()
    started_at, finished_at        ISO 8601, as the caller measured them (the container's)
    outputs.sha256                 {case: {file: sha256}} of the collected outputs
    outputs.digest                 sha256 of outputs.sha256 as canonical JSON
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import threading
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import gpu.inventory
from gpu.inventory import GPU
from runners.base import RunResult, RunSpec

PROVENANCE_FORMAT = 1  # bumped when a field changes meaning
DISTRIBUTION = "epreuve"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # a git checkout, or site-packages
BUILD_COMMIT_FILE = Path(__file__).resolve().parent / "BUILD_COMMIT"  # written when packaged
GIT_TIMEOUT_SECONDS = 5.0
COMMIT = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # SHA-1 or SHA-256 object names


class Inventory(Protocol):
    """What the node's GPUs are: gpu.inventory itself, or a stand-in in tests."""

    def list_gpus(self) -> list[GPU]: ...

    def cuda_driver_version(self) -> str | None: ...


# -- the engine ----------------------------------------------------------------------------

def engine_facts(source_root: Path = SOURCE_ROOT,
                 build_commit_file: Path = BUILD_COMMIT_FILE) -> dict[str, Any]:
    """The engine's version (its distribution's metadata) and the commit it was built from:
    `git rev-parse HEAD` in a checkout, else the file written at build time, else None."""
    commit, dirty = _git_commit(source_root)
    if commit is None:
        commit = _build_commit(build_commit_file)
    return {"version": _distribution_version(), "commit": commit, "dirty": dirty}


def _distribution_version() -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(source_root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(source_root), *args], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT_SECONDS, check=False,
                              # never take the index lock a developer's git may need
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        return None
    return done.stdout if done.returncode == 0 else None


def _git_commit(source_root: Path) -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it); (None, None) outside a checkout."""
    if not (source_root / ".git").exists():  # a directory, or a worktree's file
        return None, None
    head = _git(source_root, "rev-parse", "HEAD")
    if head is None or not COMMIT.fullmatch(head.strip()):
        return None, None
    status = _git(source_root, "status", "--porcelain", "--untracked-files=no")
    return head.strip(), None if status is None else bool(status.strip())


def _build_commit(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if COMMIT.fullmatch(text) else None


# -- the node ------------------------------------------------------------------------------

def docker_facts(info: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of `docker info` that change what a container sees or how it is confined."""
    runtimes = info.get("Runtimes") or {}
    return {
        "server_version": info.get("ServerVersion"),
        "kernel": info.get("KernelVersion"),
        "operating_system": info.get("OperatingSystem"),
        "os_type": info.get("OSType"),
        "architecture": info.get("Architecture"),
        "default_runtime": info.get("DefaultRuntime"),
        "runtimes": {str(name): _runtime_path(value) for name, value in sorted(runtimes.items())}
        if isinstance(runtimes, Mapping) else {},
        "cgroup_version": info.get("CgroupVersion"),
        "cgroup_driver": info.get("CgroupDriver"),
        "security_options": [str(option) for option in info.get("SecurityOptions") or []],
        "name": info.get("Name"),
    }


def _runtime_path(runtime: Any) -> str | None:
    if isinstance(runtime, Mapping) and runtime.get("path") is not None:
        return str(runtime["path"])
    return None


def gpu_facts(gpus: Iterable[GPU], cuda_version: str | None) -> list[dict[str, Any]]:
    """Model, memory, driver and CUDA of each GPU, by UUID (indices change across boots)."""
    return [{"uuid": g.uuid, "index": g.index, "model": g.name, "memory_bytes": g.memory_bytes,
             "driver_version": g.driver_version, "cuda_version": cuda_version}
            for g in sorted(gpus, key=lambda g: g.index)]


def docker_info(source: Any) -> Mapping[str, Any]:
    """`docker info` from what the caller holds: the dict itself, a runner (its `api`), a
    docker.DockerClient or a docker.APIClient (their `info()`)."""
    if isinstance(source, Mapping):
        return source
    api = getattr(source, "api", None)
    if api is not None and callable(getattr(api, "info", None)):
        return api.info()
    if callable(getattr(source, "info", None)):
        return source.info()
    raise TypeError(f"no docker info in a {type(source).__name__}: pass the info dict, "
                    "a runner or a Docker client")


_NODE_FACTS: dict[int, dict[str, Any]] = {}  # per process id: a forked child asks again
_NODE_LOCK = threading.Lock()


def node_facts(source: Any, *, inventory: Inventory | None = None) -> dict[str, Any]:
    """The node's facts (see docs/provenance.md), collected once per process with the real
    GPU inventory; a given `inventory` (a test's) is always asked afresh. A copy is returned:
    the caller may change it."""
    if inventory is not None:
        return collect_node_facts(docker_info(source), inventory)
    with _NODE_LOCK:
        facts = _NODE_FACTS.get(os.getpid())
        if facts is None:
            facts = collect_node_facts(docker_info(source), gpu.inventory)
            _NODE_FACTS[os.getpid()] = facts
        return copy.deepcopy(facts)


def forget_node_facts() -> None:
    """Collect afresh on the next call (after a driver or Docker upgrade, or in tests)."""
    with _NODE_LOCK:
        _NODE_FACTS.clear()


def collect_node_facts(info: Mapping[str, Any], inventory: Inventory) -> dict[str, Any]:
    return {"node_name": socket.gethostname(), "engine": engine_facts(),
            "docker": docker_facts(info),
            "gpus": gpu_facts(inventory.list_gpus(), inventory.cuda_driver_version())}


# -- the job -------------------------------------------------------------------------------

def run_spec_data(spec: RunSpec) -> dict[str, Any]:
    """The RunSpec field by field, as JSON: paths as text, tuples as lists, mappings sorted."""
    return {f.name: _plain(getattr(spec, f.name)) for f in dataclasses.fields(spec)}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def outputs_digest(output_sha256: Mapping[str, Mapping[str, str]]) -> str:
    """One sha256 over every case's output hashes (canonical JSON): two runs with the same
    digest wrote the same bytes."""
    canonical = json.dumps(_plain(output_sha256), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def job_provenance(*, image: Any, challenge: Any, phase: Any, manifest_sha256: str | None,
                   spec: RunSpec | Mapping[str, Any] | None, node: Mapping[str, Any],
                   started_at: datetime | None,
                   finished_at: datetime | None,
                   output_sha256: Mapping[str, Mapping[str, str]],
                   case_ids: Iterable[str] = (), run_result: RunResult | None = None,
                   ) -> dict[str, Any]:
    """The record of one job's run (see docs/provenance.md for every field).

    `image` has image_id, tar_sha256, layers (an ImageRow or a PinnedImage); `challenge`
    has id and definition_sha256 (a ChallengeRow); `phase` has slug and dataset_version
    (a PhaseRow); `manifest_sha256` is the sealed dataset's version as verified for this
    run; `node` is `node_facts(...)`; `output_sha256` maps each case to {file: sha256}.
    `spec` is the RunSpec, or its `run_spec_data` as a node reported it, or None when the
    job ended before a spec was made (its GPUs are then unknown).
    """
    known = {g["uuid"]: g for g in node.get("gpus", [])}
    spec_data = _spec_data(spec)
    return {
        "format": PROVENANCE_FORMAT,
        "image": {"image_id": image.image_id, "tar_sha256": image.tar_sha256,
                  "layers": list(image.layers or [])},
        "dataset": {"version": phase.dataset_version, "manifest_sha256": manifest_sha256,
                    "case_ids": list(case_ids)},
        "challenge": {"id": challenge.id, "phase": phase.slug,
                      "definition_sha256": challenge.definition_sha256},
        "run_spec": spec_data,
        "ran": {"image_id": run_result.image_id if run_result else None,
                "user": run_result.user if run_result else None},
        "engine": copy.deepcopy(node.get("engine")),
        "docker": copy.deepcopy(node.get("docker")),
        "gpus": [copy.deepcopy(known.get(uuid, {"uuid": uuid}))
                 for uuid in spec_data.get("gpu_uuids") or []],
        "node_name": node.get("node_name"),
        "started_at": _plain(started_at),
        "finished_at": _plain(finished_at),
        "outputs": {"sha256": _plain(output_sha256), "digest": outputs_digest(output_sha256)},
    }


def _spec_data(spec: RunSpec | Mapping[str, Any] | None) -> dict[str, Any]:
    if spec is None:
        return {}
    if isinstance(spec, RunSpec):
        return run_spec_data(spec)
    return _plain(spec)
