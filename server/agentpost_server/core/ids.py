"""Unique ids: ULIDs for messages (time-sortable), random ids for sessions and servers."""

from __future__ import annotations

import os
import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32


class UlidFactory:
    """Monotonic ULIDs: 48 bits of unix milliseconds, then 80 bits that are random per
    millisecond and incremented within it, so ids from one process sort in creation order."""

    def __init__(self) -> None:
        self._last_ms = -1
        self._last_random = 0

    def new(self, now_ms: int | None = None) -> str:
        ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        if ms <= self._last_ms:
            ms = self._last_ms
            self._last_random += 1
        else:
            self._last_ms = ms
            self._last_random = int.from_bytes(os.urandom(10), "big") >> 1
        value = (ms << 80) | (self._last_random & ((1 << 80) - 1))
        chars = []
        for _ in range(26):
            chars.append(_ALPHABET[value & 31])
            value >>= 5
        return "".join(reversed(chars))


def new_session_id() -> str:
    return "s-" + secrets.token_hex(8)


def new_server_id() -> str:
    return "srv-" + secrets.token_hex(5)


def new_instance_id() -> str:
    return "i-" + secrets.token_hex(8)
