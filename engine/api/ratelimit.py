"""Per-token rate limits on expensive routes: a small in-process token bucket.

Each caller (a token, or an address when anonymous) has a bucket per route family
that holds `burst` calls and refills at `per_second`; an empty bucket answers 429 with
`Retry-After`. In-process: several server processes each keep their own buckets.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from fastapi import Request

from engine.api.errors import RateLimited

MAX_BUCKETS = 100_000  # an attacker rotating addresses cannot grow this without bound


@dataclass(frozen=True)
class Rate:
    burst: int = 20
    per_second: float = 0.5


class TokenBuckets:
    def __init__(self, rate: Rate, clock=time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, family: str, caller: str) -> float:
        """Take one call; 0 when allowed, else the seconds until one is available."""
        now = self.clock()
        key = (family, caller)
        with self._lock:
            tokens, updated = self._buckets.get(key, (float(self.rate.burst), now))
            tokens = min(float(self.rate.burst), tokens + (now - updated) * self.rate.per_second)
            if tokens >= 1.0:
                if len(self._buckets) >= MAX_BUCKETS and key not in self._buckets:
                    self._buckets.clear()  # forget everyone rather than grow: fail open
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate.per_second


def caller_of(request: Request) -> str:
    principal = getattr(request.state, "principal", None)
    if principal is not None:
        return f"token:{principal.token_id}"
    return f"address:{request.client.host if request.client else 'unknown'}"


def enforce(request: Request, family: str) -> None:
    """Spend one call of `family` for this caller, or raise RateLimited (429)."""
    wait = request.app.state.rate_limits.take(family, caller_of(request))
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        raise RateLimited(f"too many {family} calls with this token: retry in {seconds} s",
                          retry_after=seconds)
