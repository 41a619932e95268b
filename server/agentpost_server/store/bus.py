"""The bus between server processes, on Redis pub/sub.

Outbound, `publish` queues a routed envelope and returns the future of the batch it joins; one
flusher sends each batch as a pipeline of PUBLISH commands (one per channel and chunk), always on
one connection and one batch at a time, so the order of publishes is the order of calls. While a
batch is in flight the next one fills: under load, many envelopes share one PUBLISH.

Inbound, one pub/sub connection listens on this server's own channel, the topics and broadcast
channels and the presence channel, and hands decoded batches to the hub. If the connection
breaks it is re-made with backoff, and the hub is told its cache may be stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from google.protobuf.message import DecodeError
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from agentpost.errors import UnavailableError
from agentpost_server.bus.v1 import bus_pb2
from agentpost_server.core.ports import Inbound, Lane, PresenceChange
from agentpost_server.store.errors import unavailable_on_redis_error
from agentpost_server.store.keys import Keys

log = logging.getLogger(__name__)

_MAX_ITEMS_PER_PUBLISH = 500
_MAX_BYTES_PER_PUBLISH = 1 << 20


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _frame(item: bus_pb2.Routed) -> bytes:
    """`item` encoded as one element of BusBatch.items (field 1, length-delimited): batches are
    built by concatenation, without copying messages into a BusBatch."""
    data = item.SerializeToString()
    return b"\x0a" + _varint(len(data)) + data


class RedisBus:
    def __init__(self, redis: Redis, keys: Keys, server_id: str) -> None:
        self._redis = redis
        self._keys = keys
        self._server_id = server_id
        self._inbound: Inbound | None = None
        self._queue: list[tuple[str, bytes]] = []
        self._batch_future: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subscribed = asyncio.Event()
        self._closing = False
        self._lanes = {
            keys.server_channel(server_id).encode(): Lane.SERVER,
            keys.topics_channel.encode(): Lane.TOPICS,
            keys.broadcast_channel.encode(): Lane.BROADCAST,
        }

    async def start(self, inbound: Inbound | None = None) -> None:
        """Start publishing and, given a hub, listening (returns once subscribed)."""
        self._inbound = inbound
        self._tasks = [asyncio.create_task(self._flush_loop(), name="bus-flush")]
        if inbound is not None:
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="bus-listen"))
            await self._subscribed.wait()

    async def close(self) -> None:
        """Send what is queued (briefly), then stop."""
        pending = self._batch_future
        if pending is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await asyncio.shield(pending)
        self._closing = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._batch_future is not None and not self._batch_future.done():
            self._batch_future.set_exception(UnavailableError("the server is stopping"))

    # ---- outbound ---------------------------------------------------------------------------

    def publish(
        self, lane: Lane, item: bus_pb2.Routed, server_id: str = ""
    ) -> asyncio.Future[None]:
        if lane is Lane.SERVER:
            channel = self._keys.server_channel(server_id)
        elif lane is Lane.TOPICS:
            channel = self._keys.topics_channel
        else:
            channel = self._keys.broadcast_channel
        if self._batch_future is None:
            self._batch_future = asyncio.get_running_loop().create_future()
        self._queue.append((channel, _frame(item)))
        self._wake.set()
        return self._batch_future

    async def announce(self, change: PresenceChange) -> None:
        message = json.dumps([change.agent_id, change.session_id, change.server_id, change.added])
        with unavailable_on_redis_error("announcing presence"):
            await self._redis.publish(self._keys.presence_channel, message)

    async def _flush_loop(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                queue, future = self._queue, self._batch_future
                self._queue, self._batch_future = [], None
                try:
                    await self._send(queue)
                except (RedisError, OSError) as exc:
                    log.warning("bus publish failed: %s", exc)
                    if future is not None and not future.done():
                        future.set_exception(
                            UnavailableError("storage is unavailable (publish failed); retry later")
                        )
                    continue
                except BaseException:
                    if future is not None and not future.done():
                        future.set_exception(UnavailableError("the server is stopping"))
                    raise
                if future is not None and not future.done():
                    future.set_result(None)

    async def _send(self, queue: list[tuple[str, bytes]]) -> None:
        by_channel: dict[str, list[bytes]] = {}
        for channel, frame in queue:
            by_channel.setdefault(channel, []).append(frame)
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, frames in by_channel.items():
                chunk: list[bytes] = []
                size = 0
                for frame in frames:
                    if chunk and (
                        len(chunk) >= _MAX_ITEMS_PER_PUBLISH
                        or size + len(frame) > _MAX_BYTES_PER_PUBLISH
                    ):
                        pipe.publish(channel, b"".join(chunk))
                        chunk, size = [], 0
                    chunk.append(frame)
                    size += len(frame)
                pipe.publish(channel, b"".join(chunk))
            await pipe.execute()

    # ---- inbound ----------------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        backoff = 0.05
        first = True
        while not self._closing:
            pubsub: PubSub = self._redis.pubsub()
            try:
                await pubsub.subscribe(*self._lanes, self._keys.presence_channel)
                if not first and self._inbound is not None:
                    self._inbound.on_bus_reset()
                    log.info("bus reconnected")
                first = False
                self._subscribed.set()
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._dispatch(message)
            except (RedisError, OSError) as exc:
                log.warning("bus connection lost (%s); reconnecting in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

    def _dispatch(self, message: dict[str, Any]) -> None:
        assert self._inbound is not None
        channel = message["channel"]
        data = message["data"]
        lane = self._lanes.get(channel)
        try:
            if lane is not None:
                self._inbound.on_routed(lane, bus_pb2.BusBatch.FromString(data))
            else:
                agent_id, session_id, server_id, added = json.loads(data)
                self._inbound.on_presence(
                    PresenceChange(str(agent_id), str(session_id), str(server_id), bool(added))
                )
        except (DecodeError, ValueError, TypeError) as exc:
            log.warning("undecodable bus message on %r dropped: %s", channel, exc)
        except Exception:
            log.exception("delivering a bus message failed")
