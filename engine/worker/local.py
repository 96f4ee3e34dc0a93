"""One machine: an agent wired to a `DbCoordinator` in the same process (the CLI's
`epreuve worker`, the demo, the tests). The agent itself still sees only tickets."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from engine import nodes, queue
from engine.config import Settings
from engine.store import BlobStore
from engine.worker.agent import Agent
from engine.worker.coordinator import DbCoordinator
from engine.worker.slots import DEFAULT_CPU_SLOTS
from engine.worker.workdirs import dead_on_this_host
from gpu.allocator import GPUAllocator
from runners.base import Runner
from runners.docker import owner_token


class Worker(Agent):
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, runner: Runner, *,
                 lease_duration: timedelta = queue.DEFAULT_LEASE,
                 heartbeat_seconds: float = 10.0, scoring_workers: int | None = None,
                 gpus: GPUAllocator | Sequence[str] | None = None,
                 maintenance_seconds: float = 5.0, store: BlobStore | None = None,
                 platform_pause_seconds: float | None = None, node_name: str | None = None,
                 cpu_slots: int = DEFAULT_CPU_SLOTS, reports_backlog: int | None = None):
        owner = owner_token()
        coordinator = DbCoordinator(sessions, settings, owner, owner_dead=dead_on_this_host,
                                    lease_duration=lease_duration, runner=runner,
                                    scoring_workers=scoring_workers, adopts_outcomes=True,
                                    lost_after=nodes.DEFAULT_LOST_LEASES * lease_duration)
        super().__init__(coordinator, runner, settings, owner=owner, gpus=gpus,
                         heartbeat_seconds=heartbeat_seconds,
                         maintenance_seconds=maintenance_seconds, store=store,
                         platform_pause_seconds=platform_pause_seconds, node_name=node_name,
                         cpu_slots=cpu_slots, reports_backlog=reports_backlog)
        coordinator.work_dir = self.work_dir  # the evaluation image's scratch: ours
        coordinator.node_id = self._register(sessions)  # in the registry, like remote nodes
        coordinator.node_samples = self.gpu_latest

    def _register(self, sessions: sessionmaker[Session]) -> int:
        with sessions() as session:
            node = nodes.register(session, self.describe(), None, self.actor)
            session.commit()
            return node.id
