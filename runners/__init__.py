"""How one container run happens on one backend.

`make_runner(backend)` chooses the backend by name (a setting, `EPREUVE_RUNNER`); the engine
sees only the `Runner` protocol of runners/base.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runners.base import Runner, RunnerError

BACKENDS = ("docker",)


class UnknownBackend(RunnerError):
    exit_code = 2


def make_runner(backend: str = "docker", *, state_dir: Path | None = None,
                **options: Any) -> Runner:
    """The runner of `backend`, with its state (output areas, run directories) in
    `state_dir`."""
    if backend == "docker":
        from runners.docker import DockerRunner

        return DockerRunner(state_dir=state_dir, **options)
    raise UnknownBackend(f"unknown runner backend {backend!r}; known: {', '.join(BACKENDS)}")
