"""Reports of ended runs, made apart from the slots: a GPU never waits for scoring.

Once a job's container has ended, its report (for a remote node: the outputs uploaded,
then `complete`, which the server answers after scoring or before it; for the local
worker: `complete`, which scores in this process) is handed to a `Reporter` and the slot
leases its next job at once. `workers` threads make the reports; a queue holds at most
`backlog` more. A slot that hands one over while the queue is full waits, holding its
slot (and its GPUs): so at most `workers + backlog` runs' outputs wait on the node's disk,
and a server that scores slower than the node runs only slows the node, never fills it.

A report that fails is handled as before the overlap: the agent's `deliver` gives the job
back as the platform's failure (INFRASTRUCTURE, retried), never the team's.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from engine.worker.heartbeat import Heartbeat
from engine.worker.protocol import JobOutcome, JobTicket

log = logging.getLogger(__name__)


@dataclass
class Report:
    """One ended run still to report; its heartbeat keeps the lease until it is made."""

    ticket: JobTicket
    outcome: JobOutcome
    heartbeat: Heartbeat


class Reporter:
    def __init__(self, deliver: Callable[[Report], None], *, workers: int, backlog: int,
                 on_done: Callable[[], None] = lambda: None):
        self.deliver = deliver
        self.on_done = on_done  # a report made may have queued new jobs (smoke -> main)
        self._queue: queue.Queue[Report | None] = queue.Queue(maxsize=max(1, backlog))
        self._lock = threading.Lock()
        self._pending = 0
        self._threads = [threading.Thread(target=self._work, daemon=True,
                                          name=f"epreuve-reporter-{index}")
                         for index in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    @property
    def pending(self) -> int:
        """Reports handed over and not yet made (queued or in the making)."""
        with self._lock:
            return self._pending

    def submit(self, report: Report) -> None:
        """Queue a report; waits while the backlog is full (back-pressure on the slot)."""
        with self._lock:
            self._pending += 1
        self._queue.put(report)

    def close(self) -> None:
        """Make every report handed over, then stop the threads (a graceful stop drains)."""
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while (report := self._queue.get()) is not None:
            try:
                self.deliver(report)
            except BaseException:  # deliver handles the job's failures; this is a bug of ours
                log.exception("reporting job %s failed", report.ticket.job_id)
            finally:
                report.heartbeat.stop()
                with self._lock:
                    self._pending -= 1
                self.on_done()
