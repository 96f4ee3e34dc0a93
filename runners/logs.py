"""A container's stdout and stderr, counted in full but kept only up to a byte cap.

The daemon's own copy is capped by the log driver (`max-size`); this one is
read from the attached stream, so it knows exactly how much was written and
whether the tail it keeps is the whole story.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable


class LogTail:
    def __init__(self, cap_bytes: int):
        self.cap_bytes = cap_bytes
        self.total_bytes = 0
        self._chunks: deque[bytes] = deque()
        self._kept = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def feed(self, chunk: bytes) -> None:
        with self._lock:
            self.total_bytes += len(chunk)
            self._chunks.append(chunk)
            self._kept += len(chunk)
            while self._kept - len(self._chunks[0]) >= self.cap_bytes:
                self._kept -= len(self._chunks.popleft())

    def follow(self, stream: Iterable[bytes]) -> None:
        """Drain `stream` in a background thread until it ends."""
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True,
                                        name="epreuve-logs")
        self._thread.start()

    def _drain(self, stream: Iterable[bytes]) -> None:
        try:
            for chunk in stream:
                self.feed(chunk)
        except Exception:  # the stream closes when the container is removed: nothing to keep
            return

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def truncated(self) -> bool:
        return self.total_bytes > self.cap_bytes

    def text(self) -> str:
        with self._lock:
            data = b"".join(self._chunks)
        return data[-self.cap_bytes:].decode("utf-8", errors="replace")
