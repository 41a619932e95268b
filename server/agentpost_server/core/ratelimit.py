"""A token bucket per agent, in this server process: `rate` messages a second, `burst` at once.

Per process, not shared through Redis: an agent whose sessions or calls land on N server processes
gets up to N times the rate. Counted are the operations that produce a message (send, publish,
broadcast, request), on a session or as a unary call.
"""

from __future__ import annotations

import math
import time

from agentpost.errors import RateLimitedError

_MAX_BUCKETS = 100_000


class RateLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self._buckets: dict[str, list[float]] = {}  # agent id -> [tokens, last refill]

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, agent_id: str) -> None:
        """Take one token for `agent_id`, or raise `RateLimitedError` with `retry_after_ms`."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        bucket = self._buckets.get(agent_id)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._prune(now)
            self._buckets[agent_id] = [self.burst - 1, now]
            return
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1:
            bucket[0] = tokens - 1
            return
        bucket[0] = tokens
        wait_ms = max(1, math.ceil((1 - tokens) / self.rate * 1000))
        raise RateLimitedError(
            f"agent {agent_id!r} is over its rate limit of {self.rate:g} messages a second"
            f" (burst {self.burst:g}); retry in {wait_ms} ms",
            metadata={"retry_after_ms": str(wait_ms), "limit": "rate_limit"},
        )

    def _prune(self, now: float) -> None:
        """Forget buckets that have filled up again (they are the same as new ones)."""
        full_after = self.burst / self.rate
        for agent_id in [a for a, b in self._buckets.items() if now - b[1] >= full_after]:
            del self._buckets[agent_id]
        if len(self._buckets) >= _MAX_BUCKETS:
            self._buckets.clear()
