"""Durable mailboxes: one Redis stream per agent, read through one consumer group ("g") whose
consumers are the agent's instances (so replicas compete and each entry goes to one of them).

An entry holds the serialized Envelope (`e`), its expiry in unix ms (`x`, 0 for none) and the
message id (`i`). Acknowledged entries are deleted, so a stream holds exactly what is not yet
acknowledged. Entries that expire or are pushed out by the count limit move to the dead-letter
stream with their reason: nothing disappears without a trace.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from agentpost.v1 import envelope_pb2
from agentpost_server.core.ports import Entry
from agentpost_server.store.codec import entries as _entries
from agentpost_server.store.codec import text as _text
from agentpost_server.store.codec import wait as _wait
from agentpost_server.store.errors import unavailable_on_redis_error
from agentpost_server.store.keys import Keys
from agentpost_server.store.writer import PipelineWriter

GROUP = "g"
DEAD_MAXLEN = 100_000

# One call appends a batch of messages to one mailbox.
# KEYS: mailbox, dead letters, agent hash, known agents set
# ARGV: agent id, max length, now ms, then per message: envelope, message id, expiry ms,
#       idempotency key name (or ""), how long to keep that key (ms).
# Returns, per message, the stored (or earlier) message id; nothing when the agent is unknown.
# (Idempotency keys are named in ARGV, so this script assumes a single Redis, not a cluster.)
_APPEND = """
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 0 then return {} end
local ids = {}
for i = 4, #ARGV, 5 do
  local idem, id = ARGV[i + 3], ARGV[i + 1]
  local prior = false
  if idem ~= '' then prior = redis.call('GET', idem) end
  if prior then
    ids[#ids + 1] = prior
  else
    redis.call('XADD', KEYS[1], '*', 'e', ARGV[i], 'x', ARGV[i + 2], 'i', id)
    if idem ~= '' then redis.call('SET', idem, id, 'PX', ARGV[i + 4]) end
    ids[#ids + 1] = id
  end
end
local over = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[2])
if over > 0 then
  for _, entry in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', over)) do
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', 100000, '*', 'e', entry[2][2], 'agent', ARGV[1],
               'reason', 'mailbox full', 'at', ARGV[3])
    redis.call('XACK', KEYS[1], 'g', entry[1])
    redis.call('XDEL', KEYS[1], entry[1])
    redis.call('HINCRBY', KEYS[3], 'dead', 1)
  end
end
return ids
"""


class RedisMailboxes:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        writer: PipelineWriter,
        *,
        max_len: int,
        idempotency_ms: int,
        retry_ms: int = 120_000,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._writer = writer
        self._max_len = max_len
        self._idempotency_ms = idempotency_ms
        self._retry_ms = retry_ms
        self._append = redis.register_script(_APPEND)

    def append(
        self,
        sender: str,
        agent_id: str,
        envelope: envelope_pb2.Envelope,
        expires_ms: int,
        idempotency_key: str,
    ) -> Any:
        """Queue the append on the writer; the future resolves with the message id (an earlier
        one for a repeated idempotency key) or None when the agent is unknown."""
        k = self._keys
        idem = k.idempotency(sender, idempotency_key) if idempotency_key else ""
        # "~" keys are the SDK's own, only for retries after a lost connection: kept briefly.
        keep_ms = self._retry_ms if idempotency_key.startswith("~") else self._idempotency_ms
        return self._writer.run_grouped(
            self._append,
            agent_id,
            [k.mailbox(agent_id), k.dead_letters, k.agent(agent_id), k.agents],
            [agent_id, self._max_len, time.time_ns() // 1_000_000],
            [envelope.SerializeToString(), envelope.id, expires_ms, idem, keep_ms],
        )

    async def ensure_group(self, agent_id: str) -> None:
        with unavailable_on_redis_error("creating the mailbox"):
            try:
                await self._redis.xgroup_create(
                    self._keys.mailbox(agent_id), GROUP, "0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def read(self, agent_id: str, consumer: str, count: int, *, pending: bool) -> list[Entry]:
        """New entries for `consumer` (or, with `pending`, the ones it holds unacknowledged)."""
        key = self._keys.mailbox(agent_id)
        with unavailable_on_redis_error("reading the mailbox"):
            try:
                raw = await self._redis.xreadgroup(
                    GROUP, consumer, {key: "0" if pending else ">"}, count=count
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group(agent_id)
                return []
        return _entries(raw[0][1]) if raw else []

    async def adopt(self, agent_id: str, consumer: str, live: set[str]) -> int:
        """Take over what consumers that are no longer live hold unacknowledged (they are then
        forgotten); `read(pending=True)` delivers it next, oldest first."""
        key = self._keys.mailbox(agent_id)
        adopted = 0
        with unavailable_on_redis_error("adopting deliveries"):
            try:
                consumers = await self._redis.xinfo_consumers(key, GROUP)
            except ResponseError:
                return 0
            for info in consumers:
                name = _text(info["name"])
                if name == consumer or name in live:
                    continue
                while True:
                    pending = await self._redis.xpending_range(
                        key, GROUP, min="-", max="+", count=500, consumername=name
                    )
                    if not pending:
                        break
                    ids = [p["message_id"] for p in pending]
                    await self._redis.xclaim(key, GROUP, consumer, 0, ids, justid=True)
                    adopted += len(ids)
                await self._redis.xgroup_delconsumer(key, GROUP, name)
        return adopted

    async def claim_stale(self, agent_id: str, consumer: str, idle_ms: int, count: int) -> int:
        """Take entries any consumer has held unacknowledged for longer than `idle_ms`."""
        key = self._keys.mailbox(agent_id)
        with unavailable_on_redis_error("claiming stale deliveries"):
            try:
                result = await self._redis.xautoclaim(
                    key, GROUP, consumer, idle_ms, "0-0", count=count, justid=True
                )
            except ResponseError:
                return 0
        return len(result[1]) if len(result) > 1 else 0

    async def ack(self, agent_id: str, stream_ids: Sequence[str]) -> None:
        key = self._keys.mailbox(agent_id)
        with unavailable_on_redis_error("acknowledging"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(key, GROUP, *stream_ids)
                pipe.xdel(key, *stream_ids)
                await pipe.execute()

    async def dead_letter(self, agent_id: str, entries: Sequence[Entry], reason: str) -> None:
        k = self._keys
        now = time.time_ns() // 1_000_000
        with unavailable_on_redis_error("dead-lettering"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for entry in entries:
                    pipe.xadd(
                        k.dead_letters,
                        {"e": entry.envelope, "agent": agent_id, "reason": reason, "at": now},
                        maxlen=DEAD_MAXLEN,
                        approximate=True,
                    )
                    pipe.xack(k.mailbox(agent_id), GROUP, entry.stream_id)
                    pipe.xdel(k.mailbox(agent_id), entry.stream_id)
                pipe.hincrby(k.agent(agent_id), "dead", len(entries))
                await pipe.execute()

    async def describe(self, agent_id: str) -> tuple[int, int, int | None, int]:
        """(depth, unacknowledged, oldest accepted unix ms or None, dead-lettered so far)."""
        k = self._keys
        key = k.mailbox(agent_id)
        with unavailable_on_redis_error("describing the mailbox"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xlen(key)
                pipe.xrange(key, "-", "+", count=1)
                pipe.hget(k.agent(agent_id), "dead")
                depth, first, dead = await pipe.execute()
            try:
                summary = await self._redis.xpending(key, GROUP)
                unacked = int(summary["pending"])
            except ResponseError:
                unacked = 0
        oldest = int(_text(first[0][0]).split("-")[0]) if first else None
        return int(depth), unacked, oldest, int(dead or 0)

    async def dead_letters(self, agent_id: str, limit: int) -> list[tuple[bytes, str, int]]:
        """(envelope, reason, dead-at ms), newest first."""
        found: list[tuple[bytes, str, int]] = []
        last = "+"
        with unavailable_on_redis_error("listing dead letters"):
            while len(found) < limit:
                raw = await self._redis.xrevrange(self._keys.dead_letters, last, "-", count=500)
                if not raw:
                    break
                for _, fields in raw:
                    data = {_text(k): v for k, v in fields.items()}
                    if agent_id and _text(data.get("agent", b"")) != agent_id:
                        continue
                    found.append((bytes(data["e"]), _text(data["reason"]), int(data["at"])))
                    if len(found) >= limit:
                        break
                last = "(" + _text(raw[-1][0])
        return found

    async def expired(
        self, agent_id: str, now_ms: int, oldest_ms: int
    ) -> tuple[list[Entry], list[Entry]]:
        """Entries past their TTL, and entries older than the retention age."""
        expired: list[Entry] = []
        aged: list[Entry] = []
        key = self._keys.mailbox(agent_id)
        start = "-"
        with unavailable_on_redis_error("sweeping the mailbox"):
            while True:
                raw = await _wait(self._redis.xrange(key, start, "+", count=1000))
                if not raw:
                    break
                for entry in _entries(raw):
                    if int(entry.stream_id.split("-")[0]) < oldest_ms:
                        aged.append(entry)
                    elif entry.expires_ms and entry.expires_ms <= now_ms:
                        expired.append(entry)
                start = "(" + _text(raw[-1][0])
        return expired, aged
