"""What one measured run produced, and the arithmetic on it (rates, percentiles)."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any

PAYLOAD_BYTES = 256
_STAMP = struct.Struct("<qq")  # send time (perf_counter_ns), sequence number
_PAD = b"x" * (PAYLOAD_BYTES - _STAMP.size)


def stamped(seq: int = 0) -> bytes:
    """A 256-byte payload that starts with the current `perf_counter_ns()` and `seq`."""
    return _STAMP.pack(time.perf_counter_ns(), seq) + _PAD


def read_stamp(payload: bytes) -> tuple[int, int]:
    """(send time in ns, sequence number) of a `stamped` payload."""
    sent, seq = _STAMP.unpack_from(payload)
    return sent, seq


def percentile(sorted_values: list[int], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return float(sorted_values[rank])


@dataclass(kw_only=True)
class Run:
    """One measured stretch: `count` operations in `seconds`, with per-operation latencies."""

    count: int
    seconds: float
    latencies_ns: list[int] = field(default_factory=list, repr=False)
    expected: int | None = None  # operations that should have completed (None: count is all)
    cpu: dict[str, float] = field(default_factory=dict)
    steps: int | None = None  # workflow steps per operation (None: not a workflow)

    @property
    def complete(self) -> bool:
        return self.expected is None or self.count >= self.expected

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def _ms(self, fraction: float) -> float:
        return percentile(sorted(self.latencies_ns), fraction) / 1e6

    @property
    def p50_ms(self) -> float:
        return self._ms(0.50)

    @property
    def p99_ms(self) -> float:
        return self._ms(0.99)

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ns, default=0) / 1e6

    @property
    def step_p50_ms(self) -> float:
        """The median run's time divided by its steps (0.0 when not a workflow)."""
        return self.p50_ms / self.steps if self.steps else 0.0

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "count": self.count,
            "expected": self.expected,
            "complete": self.complete,
            "seconds": round(self.seconds, 4),
            "rate_per_s": round(self.rate, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "cpu_percent": self.cpu,
        }
        if self.steps:
            document["steps"] = self.steps
            document["step_p50_ms"] = round(self.step_p50_ms, 3)
        return document
