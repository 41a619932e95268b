"""The bus between server processes, on Redis pub/sub.

Outbound, `publish` queues a routed envelope on the ordered pipeline writer (`store.writer`): many
envelopes share one PUBLISH, in call order. Broadcasts are also appended to the broadcast log, by
a script that publishes them with their log id. `wake` tells a server that an agent's mailbox has
new messages.

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

from agentpost_server.bus.v1 import bus_pb2
from agentpost_server.core import wire
from agentpost_server.core.names import SYSTEM_PREFIX
from agentpost_server.core.ports import Inbound, Lane, PresenceChange
from agentpost_server.store.errors import unavailable_on_redis_error
from agentpost_server.store.keys import Keys
from agentpost_server.store.writer import PipelineWriter

log = logging.getLogger(__name__)

# KEYS: log, channel; ARGV: Routed bytes, envelope bytes, log max length. Appends the message to
# the log (broadcasts or topics), then publishes the Routed with its log id (field 8) added,
# framed as one BusBatch item (field 1): the log id is only known inside the script.
_LOGGED = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[2])
local item = ARGV[1] .. string.char(0x42, #id) .. id
local n, len = #item, ''
while n > 127 do len = len .. string.char(n % 128 + 128); n = math.floor(n / 128) end
redis.call('PUBLISH', KEYS[2], string.char(0x0a) .. len .. string.char(n) .. item)
return id
"""


def _frame(item: bus_pb2.Routed) -> bytes:
    """`item` encoded as one element of BusBatch.items (field 1, length-delimited): batches are
    built by concatenation, without copying messages into a BusBatch."""
    return wire.field(1, item.SerializeToString())


def _wake_frame(agent_id: str) -> bytes:
    """`agent_id` as one element of BusBatch.wake (field 2)."""
    return wire.field(2, agent_id.encode())


class RedisBus:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        server_id: str,
        writer: PipelineWriter,
        *,
        broadcast_retention: int = 100_000,  # entries kept in each log
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._server_id = server_id
        self._writer = writer
        self._logged = redis.register_script(_LOGGED)
        self._retention = broadcast_retention
        self._inbound: Inbound | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._wake_batch: asyncio.Future[None] | None = None
        self._woken: set[str] = set()
        self._woken_batch_watched = False
        self._subscribed = asyncio.Event()
        self._closing = False
        self._tasks_channel = keys.tasks_channel.encode()
        self._workflows_channel = keys.workflows_channel.encode()
        self._lanes = {
            keys.server_channel(server_id).encode(): Lane.SERVER,
            keys.topics_channel.encode(): Lane.TOPICS,
            keys.broadcast_channel.encode(): Lane.BROADCAST,
            keys.wake_channel.encode(): Lane.WAKE,
        }

    async def start(self, inbound: Inbound) -> None:
        """Start listening for the hub; returns once subscribed."""
        self._inbound = inbound
        self._tasks.append(asyncio.create_task(self._listen_loop(), name="bus-listen"))
        await self._subscribed.wait()

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- outbound ---------------------------------------------------------------------------

    def publish(self, lane: Lane, item: bus_pb2.Routed, server_id: str = "") -> asyncio.Future[Any]:
        if lane is Lane.SERVER:
            return self._writer.publish(self._keys.server_channel(server_id), _frame(item))
        # Topic publishes and broadcasts are also logged, for agents that were away (broadcasts)
        # and for durable subscriptions (topics). System events are not.
        k = self._keys
        if lane is Lane.TOPICS:
            if item.envelope.recipient.topic.startswith(SYSTEM_PREFIX):
                return self._writer.publish(k.topics_channel, _frame(item))
            keys = [k.topic_log, k.topics_channel]
        else:
            keys = [k.broadcast_log, k.broadcast_channel]
        return self._writer.run_script(
            self._logged,
            keys,
            [item.SerializeToString(), item.envelope.SerializeToString(), self._retention],
        )

    def wake(self, agent_id: str) -> None:
        """Tell every server process that `agent_id`'s mailbox has new messages: published after
        the writes queued so far, once per agent per batch."""
        batch = self._writer.batch()
        if batch is not self._wake_batch:
            self._wake_batch, self._woken, self._woken_batch_watched = batch, set(), False
        if agent_id not in self._woken:
            self._woken.add(agent_id)
            if not self._woken_batch_watched:
                self._woken_batch_watched = True
                batch.add_done_callback(_consume)  # the sends report failures themselves
            self._writer.publish(self._keys.wake_channel, _wake_frame(agent_id), announces=True)

    async def announce(self, change: PresenceChange) -> None:
        message = json.dumps([change.agent_id, change.session_id, change.server_id, change.added])
        with unavailable_on_redis_error("announcing presence"):
            await self._redis.publish(self._keys.presence_channel, message)

    # ---- inbound ----------------------------------------------------------------------------

    async def _listen_loop(self) -> None:
        backoff = 0.05
        first = True
        while not self._closing:
            pubsub: PubSub = self._redis.pubsub()
            try:
                await pubsub.subscribe(
                    *self._lanes,
                    self._keys.presence_channel,
                    self._keys.tasks_channel,
                    self._keys.workflows_channel,
                )
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
            elif channel == self._tasks_channel:
                self._inbound.on_task_event(data.decode())
            elif channel == self._workflows_channel:
                self._inbound.on_workflow_event(data.decode())
            else:
                agent_id, session_id, server_id, added = json.loads(data)
                self._inbound.on_presence(
                    PresenceChange(str(agent_id), str(session_id), str(server_id), bool(added))
                )
        except (DecodeError, ValueError, TypeError) as exc:
            log.warning("undecodable bus message on %r dropped: %s", channel, exc)
        except Exception:
            log.exception("delivering a bus message failed")


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
