"""A node's slots, and the loop that keeps them full.

A node with N GPUs runs up to N GPU jobs at once: one GPU slot per GPU, and a job that
needs k GPUs takes k of them (the GPUAllocator's file locks hand out the UUIDs, so other
worker processes on the node are counted too). Jobs that need no GPU run in CPU slots
(`--cpu-slots`, DEFAULT_CPU_SLOTS): a CPU job never sits on a GPU, and a GPU job never
waits behind CPU work.

`SlotLoop` is the node's one leasing thread: while a slot is free it leases a job that
fits what is free (`lease(free GPUs)` when a CPU slot is free, else `lease(free GPUs,
min_gpus=1)`), takes its slot and runs it on a thread of its own: heartbeat, telemetry,
work dir and cancel are that job's. When its container has ended, the run's report goes
to the Reporter (reporter.py) and the slot is free for the next lease at once. A stop
(SIGTERM, the stop event) ends the leasing; running jobs finish and are reported before
`run` returns. A SIGKILL loses nothing: the agent's guarantees hold per job.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from engine.worker.protocol import Coordinator, JobTicket
from engine.worker.reporter import Report, Reporter
from gpu.allocator import Allocation, GPUAllocator, NotEnoughGPUs

log = logging.getLogger(__name__)

# One CPU slot: a job's container may use several cores (its `cpus` limit) and a GPU
# job's own data loading needs the node's CPUs too; a node made for CPU work says more.
DEFAULT_CPU_SLOTS = 1


@dataclass
class Taken:
    """The slots one job holds: its GPUs (by UUID) or one CPU slot."""

    names: tuple[str, ...]
    allocation: Allocation
    cpu: bool


@dataclass
class SlotUse:
    """One container's time in its slots (monotonic seconds): what busy fractions sum."""

    slots: tuple[str, ...]
    job_id: int
    started: float
    ended: float


class Slots:
    """What the node can take now, and who holds what."""

    def __init__(self, gpus: GPUAllocator, cpu_slots: int):
        if cpu_slots < 0:
            raise ValueError("cpu_slots must be 0 or more")
        self.gpus = gpus
        self.cpu_slots = cpu_slots
        self._changed = threading.Condition()
        self._cpu_held: set[str] = set()
        self._busy = 0
        self.uses: list[SlotUse] = []  # every container's time in its slots, for the record
        self.dry: list[tuple[float, float]] = []  # when a slot was free and nothing queued
        self._dry_since: float | None = None

    @property
    def total(self) -> int:
        return len(self.gpus.uuids) + self.cpu_slots

    @property
    def busy(self) -> int:
        with self._changed:
            return self._busy

    def free_cpu(self) -> int:
        with self._changed:
            return self.cpu_slots - len(self._cpu_held)

    def take(self, ticket: JobTicket) -> Taken:
        """The job's slots: its GPUs (NotEnoughGPUs when another process took them since
        the lease), or a CPU slot (one beyond the count for a CPU job a server handed a
        GPU slot: run, never dropped)."""
        if ticket.gpus:
            allocation = self.gpus.allocate(ticket.gpus)
            taken = Taken(allocation.uuids, allocation, cpu=False)
        else:
            with self._changed:
                name = next(f"cpu-{index}" for index in range(self.cpu_slots + len(
                    self._cpu_held) + 1) if f"cpu-{index}" not in self._cpu_held)
                self._cpu_held.add(name)
            taken = Taken((name,), Allocation(()), cpu=True)
        with self._changed:
            self._busy += 1
        return taken

    def release(self, taken: Taken) -> None:
        taken.allocation.release()
        with self._changed:
            if taken.cpu:
                self._cpu_held.discard(taken.names[0])
            self._busy -= 1
            self._changed.notify_all()

    def changed(self) -> None:
        """Something may be free or queued now (a report was made): wake the leasing."""
        with self._changed:
            self._changed.notify_all()

    def wait(self, seconds: float) -> None:
        with self._changed:
            self._changed.wait(seconds)

    def note_lease(self, *, found: bool, had_room: bool) -> None:
        """Keep the spans when the queue had nothing for a free slot (a busy fraction is
        of the time the queue holds work)."""
        now = time.monotonic()
        with self._changed:
            if not found and had_room and self._dry_since is None:
                self._dry_since = now
            elif found and self._dry_since is not None:
                self.dry.append((self._dry_since, now))
                self._dry_since = None

    def record(self, taken: Taken, job_id: int, started: float, ended: float) -> None:
        with self._changed:
            self.uses.append(SlotUse(taken.names, job_id, started, ended))


class SlotAgent(Protocol):
    """What the loop asks of the agent (agent.py): one job's run, and its report."""

    coordinator: Coordinator

    def maintain(self, *, now: bool = False) -> None: ...

    def ready_to_claim(self) -> bool: ...

    def survive_run(self, ticket: JobTicket, taken: Taken) -> Report | None: ...

    def deliver(self, report: Report) -> None: ...

    def give_back_unfit(self, ticket: JobTicket, exc: NotEnoughGPUs) -> None: ...


@dataclass
class SlotLoop:
    """Lease into free slots until stopped (or idle, or `max_jobs` leased), then drain."""

    agent: SlotAgent
    slots: Slots
    reports_backlog: int | None = None  # reports queued beyond those being made
    _threads: list[threading.Thread] = field(default_factory=list)

    def run(self, stop: threading.Event, *, until_idle: bool, idle_seconds: float,
            max_jobs: int | None) -> int:
        reporter = Reporter(self.agent.deliver, workers=self.slots.total,
                            backlog=self.reports_backlog or self.slots.total,
                            on_done=self.slots.changed)
        leased = 0
        try:
            while not stop.is_set() and (max_jobs is None or leased < max_jobs):
                self.agent.maintain()
                if not self.agent.ready_to_claim():  # a job claimed now would only fail
                    self.slots.wait(idle_seconds)  # as INFRASTRUCTURE: the runtime rests
                    continue
                ticket = self.lease()
                if ticket is None and until_idle and self._idle(reporter):
                    self.agent.maintain(now=True)  # idle only once nothing is left to sweep
                    if (ticket := self.lease()) is None and self._idle(reporter):
                        break
                if ticket is None:
                    self.slots.wait(min(idle_seconds, 0.5) if until_idle else idle_seconds)
                    continue
                leased += 1
                self.start(ticket, reporter)
        finally:
            for thread in self._threads:  # running jobs finish...
                thread.join()
            reporter.close()  # ...and are reported
        return leased

    def _idle(self, reporter: Reporter) -> bool:
        """Nothing of ours may still queue more: no run going, no report being made, no
        reported run still being scored (its end queues the next jobs)."""
        return not (self.slots.busy or reporter.pending
                    or self.agent.coordinator.awaiting_scoring())

    def lease(self) -> JobTicket | None:
        """A job that fits what is free now, or None (nothing free, or nothing queued)."""
        free_gpus, free_cpu = self.slots.gpus.free_count(), self.slots.free_cpu()
        if free_cpu > 0:
            ticket = self.agent.coordinator.lease(free_gpus)
        elif free_gpus > 0:
            ticket = self.agent.coordinator.lease(free_gpus, min_gpus=1)
        else:
            return None
        self.slots.note_lease(found=ticket is not None, had_room=True)
        return ticket

    def start(self, ticket: JobTicket, reporter: Reporter) -> None:
        try:
            taken = self.slots.take(ticket)
        except NotEnoughGPUs as exc:  # another process on the node took them meanwhile
            self.agent.give_back_unfit(ticket, exc)
            return
        thread = threading.Thread(target=self._slot, args=(ticket, taken, reporter),
                                  daemon=True, name=f"epreuve-slot-{taken.names[0]}")
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _slot(self, ticket: JobTicket, taken: Taken, reporter: Reporter) -> None:
        """One job in its slots: run it, hand its report over, free the slots (only then:
        a full report backlog holds the slot, bounding the outputs waiting on disk)."""
        try:
            report = self.agent.survive_run(ticket, taken)
            if report is not None:
                reporter.submit(report)
        finally:
            self.slots.release(taken)


def busy_fractions(uses: list[SlotUse], names: list[str], start: float, end: float,
                   excluded: list[tuple[float, float]] = ()) -> dict[str, float]:
    """Each slot's share of the window [start, end] with a container running in it, the
    `excluded` spans (disjoint: the queue had nothing to give) left out of both sides."""
    def within(a: float, b: float) -> float:
        inside = max(0.0, min(b, end) - max(a, start))
        return inside - sum(max(0.0, min(b, e, end) - max(a, s, start)) for s, e in excluded)

    window = max(within(start, end), 1e-9)
    busy = dict.fromkeys(names, 0.0)
    for use in uses:
        for name in use.slots:
            busy[name] = busy.get(name, 0.0) + within(use.started, use.ended)
    return {name: seconds / window for name, seconds in busy.items()}
