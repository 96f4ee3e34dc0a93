"""One job's heartbeat: renews its lease from a thread of its own until stopped.

Every job has its own (slots run several at once): `lost` is set when the coordinator
says the job was taken back (swept, cancelled), and the slot running it stops that
container only. A coordinator that cannot be reached is tried again at the next beat:
the lease may still hold.
"""

from __future__ import annotations

import logging
import threading

from engine.worker.protocol import Coordinator, JobTicket

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, coordinator: Coordinator, ticket: JobTicket, seconds: float):
        self.coordinator = coordinator
        self.ticket = ticket
        self.seconds = seconds
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"epreuve-heartbeat-{ticket.job_id}")

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _beat(self) -> None:
        while not self._done.wait(self.seconds):
            try:
                alive = self.coordinator.heartbeat(self.ticket)
            except Exception:  # the coordinator is unreachable: the lease may still hold
                log.exception("heartbeat of job %s failed", self.ticket.job_id)
                continue
            if not alive:
                self.lost.set()  # swept or cancelled: stop the container
                return
