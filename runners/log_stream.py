"""A container's log sent on while it runs: in chunks, at a bounded rate and amount.

The runner drains the attached stream into its LogTail (the log kept for the result);
each chunk is also handed here, and a thread passes what came to `send` at most once
every `interval` seconds, at most `chunk_bytes` at a time (the newest bytes kept when more
came meanwhile: a live tail is for now, not for history) and at most `total_bytes` per
run (then one note, and nothing more: the whole log is in the result). Text is decoded
incrementally (a character split across chunks stays whole) and rendered (logs.shown):
participant output is hostile. `send` failing never touches the run: the live log is a
convenience, the result is the record.
"""

from __future__ import annotations

import codecs
import logging
import threading
from collections.abc import Callable

from runners.logs import shown

log = logging.getLogger(__name__)
CHUNK_BYTES = 16 << 10
TOTAL_BYTES = 512 << 10
INTERVAL_SECONDS = 2.0
CUT_NOTE = "\n[the live log stops here: the rest is in the run's result]\n"
SKIPPED_NOTE = "\n[{0} byte(s) skipped: the log came faster than it is sent]\n"


class LogStream:
    def __init__(self, send: Callable[[str], None], *, chunk_bytes: int = CHUNK_BYTES,
                 total_bytes: int = TOTAL_BYTES, interval: float = INTERVAL_SECONDS):
        self.send = send
        self.chunk_bytes = chunk_bytes
        self.total_bytes = total_bytes
        self.interval = interval
        self.sent_bytes = 0
        self._pending = bytearray()
        self._skipped = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._cut = False
        self._thread = threading.Thread(target=self._pump, daemon=True, name="epreuve-log-stream")

    def start(self) -> LogStream:
        self._thread.start()
        return self

    def feed(self, chunk: bytes) -> None:
        """Called from the drain thread for every chunk the container wrote."""
        with self._lock:
            if self._cut:
                return
            self._pending += chunk
            excess = len(self._pending) - self.chunk_bytes
            if excess > 0:  # keep the newest: count what is skipped, say so once sent
                del self._pending[:excess]
                self._skipped += excess

    def close(self, timeout: float = 5.0) -> None:
        """Send what is left, then stop (the run has ended)."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _pump(self) -> None:
        while not self._closed.wait(self.interval):
            self._flush()
        self._flush(final=True)

    def _flush(self, final: bool = False) -> None:
        text = self._take(final)
        if not text:
            return
        try:
            self.send(text)
        except Exception as exc:  # the server is away: this chunk is lost, the run goes on
            log.warning("a live log chunk was not delivered: %s", exc)

    def _take(self, final: bool) -> str:
        with self._lock:
            if self._cut:
                return ""
            data, skipped = bytes(self._pending), self._skipped
            self._pending.clear()
            self._skipped = 0
            if self.sent_bytes + len(data) > self.total_bytes:
                data = data[:max(0, self.total_bytes - self.sent_bytes)]
                self._cut = True
            self.sent_bytes += len(data)
        text = self._decoder.decode(data, final=final or self._cut)
        if skipped:
            text = SKIPPED_NOTE.format(skipped) + text.lstrip("\ufffd")
        text = shown(text)
        return text + CUT_NOTE if self._cut else text
