"""Workers: a node's agent (agent.py, no database) and the coordinator it reports to
(protocol.py: the seam; coordinator.py: over the database), and the trusted side's
scorer (scorer.py: the only reader of ground truth). local.py wires the agent and the
coordinator for one machine. The names below are loaded when first used, so that importing the agent
loads no database code (a remote node has none)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Agent": "engine.worker.agent",
    "Coordinator": "engine.worker.protocol",
    "JobOutcome": "engine.worker.protocol",
    "JobTicket": "engine.worker.protocol",
    "DbCoordinator": "engine.worker.coordinator",
    "Scorer": "engine.worker.scorer",
    "Worker": "engine.worker.local",
    "claim_work_dir": "engine.worker.workdirs",
    "dead_on_this_host": "engine.worker.workdirs",
    "remove_dead_workers_dirs": "engine.worker.workdirs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
