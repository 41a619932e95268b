"""Following a numbered log as it grows: a task's history, a workflow run's events.

`Follow.stream` reads what is after the position, yields it, and waits for a wake-up (from the
bus: "this log grew") before reading again; it re-reads every few seconds anyway, should a
wake-up be lost. It ends after an entry that `ends` says is the last, or when `finished` says
nothing more will come.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

E = TypeVar("E")

RECHECK = 5.0  # seconds between re-reads while nothing wakes a stream


class Follow(Generic[E]):
    def __init__(self, *, recheck: float = RECHECK) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}
        self._recheck = recheck

    def notify(self, key: str) -> None:
        """The log `key` grew."""
        for wakeup in self._waiting.get(key, ()):
            wakeup.set()

    def notify_all(self) -> None:
        """Wake-ups may have been missed (the bus reconnected)."""
        for waiting in self._waiting.values():
            for wakeup in waiting:
                wakeup.set()

    async def stream(
        self,
        key: str,
        after: int,
        *,
        read: Callable[[int], Awaitable[Sequence[E]]],
        position: Callable[[E], int],
        ends: Callable[[E], bool],
        finished: Callable[[int], Awaitable[bool]],
    ) -> AsyncIterator[list[E]]:
        """Batches of entries after `after`, in order, until the last one."""
        wakeup = asyncio.Event()
        self._waiting.setdefault(key, set()).add(wakeup)
        try:
            while True:
                wakeup.clear()
                entries = list(await read(after))
                if entries:
                    yield entries
                    after = position(entries[-1])
                    if ends(entries[-1]):
                        return
                    continue
                if await finished(after):
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._recheck):
                        await wakeup.wait()
        finally:
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(wakeup)
                if not waiting:
                    del self._waiting[key]
