"""Workers: a node's agent (agent.py, no database) and the coordinator it reports to
(protocol.py: the seam; coordinator.py: over the database). local.py wires the two for
one machine."""

from engine.worker.agent import Agent
from engine.worker.coordinator import DbCoordinator
from engine.worker.local import Worker
from engine.worker.protocol import Coordinator, JobOutcome, JobTicket
from engine.worker.workdirs import claim_work_dir, dead_on_this_host, remove_dead_workers_dirs

__all__ = ["Agent", "Coordinator", "DbCoordinator", "JobOutcome", "JobTicket", "Worker",
           "claim_work_dir", "dead_on_this_host", "remove_dead_workers_dirs"]
