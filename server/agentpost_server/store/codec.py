"""Small helpers for what redis-py hands back: awaiting its loosely typed commands, bytes to text,
and stream entries to `Entry`."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar, cast

from agentpost_server.core.ports import Entry

T = TypeVar("T")


async def wait(result: Awaitable[T] | T) -> T:
    """redis-py types commands as `Awaitable[T] | T` (sync and async share the stubs)."""
    return await cast(Awaitable[T], result)


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def entries(raw: Any) -> list[Entry]:
    """XRANGE/XREADGROUP entries with fields e (envelope), x (expiry ms); deleted ones skipped."""
    found = []
    for stream_id, fields in raw or ():
        if not fields:
            continue  # deleted while pending
        data = {text(k): v for k, v in fields.items()}
        found.append(Entry(text(stream_id), int(data.get("x") or 0), bytes(data["e"])))
    return found
