"""Unique ids: ULIDs for messages (time-sortable), random ids for sessions and servers."""

from __future__ import annotations

import os
import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]  # 10 bits -> two characters
_MASK_80 = (1 << 80) - 1


def _time_part(ms: int) -> str:
    """48 bits of milliseconds as 10 characters."""
    return "".join(_ALPHABET[(ms >> shift) & 31] for shift in range(45, -5, -5))


class UlidFactory:
    """Monotonic ULIDs: 48 bits of unix milliseconds, then 80 bits that are random per
    millisecond and incremented within it, so ids from one process sort in creation order."""

    def __init__(self) -> None:
        self._last_ms = -1
        self._last_random = 0
        self._prefix = ""

    def new(self, now_ms: int | None = None) -> str:
        ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        if ms <= self._last_ms:
            self._last_random = (self._last_random + 1) & _MASK_80
        else:
            self._last_ms = ms
            self._last_random = int.from_bytes(os.urandom(10), "big") >> 1
            self._prefix = _time_part(ms)
        r = self._last_random
        p = _PAIRS
        return (
            self._prefix
            + p[r >> 70]
            + p[(r >> 60) & 1023]
            + p[(r >> 50) & 1023]
            + p[(r >> 40) & 1023]
            + p[(r >> 30) & 1023]
            + p[(r >> 20) & 1023]
            + p[(r >> 10) & 1023]
            + p[r & 1023]
        )


def new_session_id() -> str:
    return "s-" + secrets.token_hex(8)


def new_server_id() -> str:
    return "srv-" + secrets.token_hex(5)


def new_instance_id() -> str:
    return "i-" + secrets.token_hex(8)
