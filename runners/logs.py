"""A container's stdout and stderr, counted in full but kept only up to a byte cap.

The daemon's own copy is capped by the log driver (`max-size`); this one is
read from the attached stream, so it knows exactly how much was written and
whether the tail it keeps is the whole story.

Its text is shown to organisers and participants (a terminal, a report, the
database), so it is rendered, never replayed: invalid UTF-8 becomes U+FFFD and
every control character but newline and tab (escape sequences, NUL, C1 codes,
bidirectional overrides) is written out as `\\xNN` or `\\uNNNN`.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable, Iterable

# C0 and C1 controls (but \t and \n), bidi embeddings, overrides and isolates, BOM
UNSHOWABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f"
                        "\u202a-\u202e\u2066-\u2069\ufeff]")


def shown(text: str) -> str:
    """`text` with every control character written out: nothing a terminal would obey."""
    text = text.replace("\r\n", "\n")
    return UNSHOWABLE.sub(lambda match: _escaped(match.group()), text)


def _escaped(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


class LogTail:
    def __init__(self, cap_bytes: int, listener: Callable[[bytes], None] | None = None):
        self.cap_bytes = cap_bytes
        self.listener = listener  # sees every chunk as it comes (runners/log_stream.py)
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
                if self.listener is not None:
                    self.listener(chunk)
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
        return shown(data[-self.cap_bytes:].decode("utf-8", errors="replace"))
