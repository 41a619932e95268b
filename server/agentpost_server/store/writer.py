"""The ordered, batching writer every outbound Redis write of the hot path goes through.

Callers queue commands without awaiting; one flusher sends everything queued as ONE pipeline on
one connection, one batch at a time, so commands run in call order and under load many share a
round trip. Scripts (mailbox appends) run first, in order; then PUBLISHes, grouped per channel
(each channel's frames concatenated, in order, into as few messages as the size caps allow) —
so a wake-up is never published before the write it announces. When Redis lost its scripts (it
restarted), the scripts of a batch are loaded and run again in the next one, and the wake-ups
that came with them are published again after them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError, ResponseError

from agentpost.errors import UnavailableError

log = logging.getLogger(__name__)

MAX_ITEMS_PER_PUBLISH = 500
MAX_BYTES_PER_PUBLISH = 1 << 20


@dataclass(slots=True)
class _Script:
    script: AsyncScript
    keys: list[str]
    args: list[Any]
    future: asyncio.Future[Any]
    group: str | None = None  # calls of one script and group in a batch run as one call
    head: list[Any] | None = None  # a grouped call's leading arguments (the same for the group)


class PipelineWriter:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._scripts: list[_Script] = []
        self._publishes: list[tuple[str, bytes]] = []
        self._repeatable: list[tuple[str, bytes]] = []  # this batch's announcements
        self._batch: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_loop(), name="redis-writer")

    async def close(self) -> None:
        """Send what is queued (briefly), then stop."""
        pending = self._batch
        if pending is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(pending)
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail(self._batch, self._scripts, UnavailableError("the server is stopping"))

    def publish(
        self, channel: str, frame: bytes, *, announces: bool = False
    ) -> asyncio.Future[None]:
        """Queue a PUBLISH of `frame` (frames to one channel are concatenated in order). The
        future, shared by the batch, resolves once Redis took the batch. A frame that
        `announces` the scripts queued before it (a wake-up: harmless to repeat) is published
        again after them if they have to be run again."""
        self._publishes.append((channel, frame))
        if announces:
            self._repeatable.append((channel, frame))
        return self._batch_future()

    def run_script(
        self, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> asyncio.Future[Any]:
        """Queue a script call; its own future resolves with its result."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._scripts.append(_Script(script, keys, args, future))
        self._batch_future()
        return future

    def batch(self) -> asyncio.Future[None]:
        """The future of the batch being filled now (a new one if none is)."""
        return self._batch_future()

    def run_grouped(
        self, script: AsyncScript, group: str, keys: list[str], head: list[Any], args: list[Any]
    ) -> asyncio.Future[Any]:
        """Queue a call that may share one script run with the other calls of `group` in the
        batch: the script gets `keys`, then `head`, then every call's `args` in order, and
        returns one result per call (a missing result resolves to None)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._scripts.append(_Script(script, keys, args, future, group, head))
        self._batch_future()
        return future

    def _batch_future(self) -> asyncio.Future[None]:
        if self._batch is None:
            self._batch = asyncio.get_running_loop().create_future()
            self._wake.set()
        return self._batch

    async def _flush_loop(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            while self._batch is not None:
                batch, scripts, publishes = self._batch, self._scripts, self._publishes
                repeatable = self._repeatable
                self._batch, self._scripts, self._publishes = None, [], []
                self._repeatable = []
                calls, members = _merge(scripts)
                try:
                    results = await self._send(calls, publishes)
                except (RedisError, OSError) as exc:
                    log.warning("redis write failed: %s", exc)
                    self._fail(
                        batch,
                        scripts,
                        UnavailableError("storage is unavailable (write failed); retry later"),
                    )
                    continue
                except Exception:
                    log.exception("redis write failed unexpectedly")
                    self._fail(batch, scripts, UnavailableError("storage write failed; retry"))
                    continue
                except BaseException:
                    self._fail(batch, scripts, UnavailableError("the server is stopping"))
                    raise
                retry: list[_Script] = []
                for call, result in zip(calls, results, strict=False):
                    group = members.get(id(call))
                    items = group if group is not None else [call]
                    if isinstance(result, NoScriptError):
                        retry.extend(items)
                    elif isinstance(result, Exception):
                        log.warning("redis script failed: %s", result)
                        for item in items:
                            if not item.future.done():
                                item.future.set_exception(
                                    UnavailableError("storage refused the write; retry later")
                                )
                    elif group is None:
                        if not call.future.done():
                            call.future.set_result(result)
                    else:
                        values = list(result or ())
                        for index, item in enumerate(group):
                            if not item.future.done():
                                item.future.set_result(
                                    values[index] if index < len(values) else None
                                )
                if retry:
                    await self._requeue(retry, repeatable)
                if not batch.done():
                    batch.set_result(None)

    async def _requeue(self, items: list[_Script], announcements: list[tuple[str, bytes]]) -> None:
        """Load the scripts Redis forgot; run the calls again first in the next batch, and
        publish again what announced them (it went out before the writes it announces)."""
        try:
            for script in {id(i.script): i.script for i in items}.values():
                script.sha = await self._redis.script_load(script.script)
        except (RedisError, OSError):
            self._fail(None, items, UnavailableError("storage is unavailable; retry later"))
            return
        self._scripts[:0] = items
        self._publishes[:0] = announcements
        self._repeatable[:0] = announcements
        self._batch_future()

    async def _send(self, scripts: list[_Script], publishes: list[tuple[str, bytes]]) -> list[Any]:
        """One write of every command, RESP-encoded here (redis-py's generic packer costs more
        than the rest of the hot path together), then one reply read per command."""
        out: list[bytes] = []
        count = 0
        for item in scripts:
            # EVALSHA without a SCRIPT EXISTS check per batch; a NOSCRIPT answer (Redis
            # restarted) reloads the script and retries the call.
            _command(out, (b"EVALSHA", item.script.sha, len(item.keys), *item.keys, *item.args))
            count += 1
        by_channel: dict[str, list[bytes]] = {}
        for channel, frame in publishes:
            by_channel.setdefault(channel, []).append(frame)
        for channel, frames in by_channel.items():
            chunk: list[bytes] = []
            size = 0
            for frame in frames:
                full = len(chunk) >= MAX_ITEMS_PER_PUBLISH
                if chunk and (full or size + len(frame) > MAX_BYTES_PER_PUBLISH):
                    _command(out, (b"PUBLISH", channel, b"".join(chunk)))
                    count += 1
                    chunk, size = [], 0
                chunk.append(frame)
                size += len(frame)
            _command(out, (b"PUBLISH", channel, b"".join(chunk)))
            count += 1
        pool = self._redis.connection_pool
        connection = await pool.get_connection()
        try:
            await connection.send_packed_command(b"".join(out), check_health=False)
            results: list[Any] = []
            for _ in range(count):
                try:
                    results.append(await connection.read_response())
                except ResponseError as exc:
                    results.append(exc)
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await pool.release(connection)
        return results

    @staticmethod
    def _fail(
        batch: asyncio.Future[None] | None, scripts: list[_Script], error: UnavailableError
    ) -> None:
        for item in scripts:
            if not item.future.done():
                item.future.set_exception(error)
        if batch is not None and not batch.done():
            batch.set_exception(error)


def _command(out: list[bytes], args: tuple[Any, ...]) -> None:
    """Append one RESP array of bulk strings."""
    out.append(b"*%d\r\n" % len(args))
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")


def _merge(scripts: list[_Script]) -> tuple[list[_Script], dict[int, list[_Script]]]:
    """Join the grouped calls of a batch: one call per script and group, in the place of the
    group's first call. Returns the calls and, for each joined call, the calls it stands for."""
    calls: list[_Script] = []
    members: dict[int, list[_Script]] = {}
    joined: dict[tuple[str, str], _Script] = {}
    for item in scripts:
        if item.group is None:
            calls.append(item)
            continue
        key = (item.script.sha, item.group)
        call = joined.get(key)
        if call is None:
            call = _Script(item.script, item.keys, list(item.head or ()), item.future, item.group)
            joined[key] = call
            calls.append(call)
            members[id(call)] = []
        call.args.extend(item.args)
        members[id(call)].append(item)
    return calls, members
