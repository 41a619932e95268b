"""The broadcast log and the topic log (Redis streams of recent publishes, trimmed by count), and
each agent's positions in them: one for broadcasts, one per durable topic subscription. Agents
that were away catch up from their position; acknowledgements move it forward, never back."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from redis.asyncio import Redis

from agentpost.errors import AgentpostError
from agentpost_server.core import names
from agentpost_server.core.ports import Entry
from agentpost_server.store.codec import entries as _entries
from agentpost_server.store.codec import text as _text
from agentpost_server.store.codec import wait as _wait
from agentpost_server.store.errors import unavailable_on_redis_error
from agentpost_server.store.keys import Keys
from agentpost_server.store.writer import PipelineWriter

log = logging.getLogger(__name__)

BROADCASTS = ""  # the position name of the broadcast log

# KEYS: hash; ARGV: field, log id. Sets the field to the id if it is later than the current one.
_ADVANCE = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or '0-0'
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms) or 0, tonumber(seq) or 0
end
local cms, cseq = parts(cur)
local nms, nseq = parts(ARGV[2])
if nms > cms or (nms == cms and nseq > cseq) then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
"""


class RedisLogs:
    def __init__(self, redis: Redis, keys: Keys, writer: PipelineWriter) -> None:
        self._redis = redis
        self._keys = keys
        self._writer = writer
        self._advance = redis.register_script(_ADVANCE)

    def _log_key(self, log: str) -> str:
        """ "broadcasts" or "topics"."""
        return self._keys.broadcast_log if log == "broadcasts" else self._keys.topic_log

    def _position_of(self, agent_id: str, name: str) -> tuple[str, str]:
        if name == BROADCASTS:
            return self._keys.agent(agent_id), "bpos"
        return self._keys.durable_positions(agent_id), name

    async def latest(self, log: str) -> str:
        with unavailable_on_redis_error("reading the log"):
            raw = await _wait(self._redis.xrevrange(self._log_key(log), "+", "-", count=1))
        return _text(raw[0][0]) if raw else "0-0"

    async def since(self, log: str, log_id: str, count: int) -> list[Entry]:
        with unavailable_on_redis_error("reading the log"):
            raw = await _wait(
                self._redis.xrange(self._log_key(log), "(" + log_id, "+", count=count)
            )
        return _entries(raw)

    async def position(self, agent_id: str, name: str) -> str:
        key, field = self._position_of(agent_id, name)
        with unavailable_on_redis_error("reading a position"):
            value = await _wait(self._redis.hget(key, field))
        return _text(value) if value else "0-0"

    def advance(self, agent_id: str, name: str, log_id: str) -> asyncio.Future[Any]:
        """Queued on the writer with the other hot-path writes (not awaited by the pump: a
        position lost to a crash only means a broadcast shown again, and dropped by the SDK)."""
        key, field = self._position_of(agent_id, name)
        return self._writer.run_script(self._advance, [key], [field, log_id])

    async def durable_subscriptions(self, agent_id: str) -> dict[str, list[str]]:
        with unavailable_on_redis_error("reading durable subscriptions"):
            raw = await _wait(self._redis.hgetall(self._keys.durable_patterns(agent_id)))
        found: dict[str, list[str]] = {}
        for name, patterns in raw.items():
            try:  # validated on the way out: only well-formed patterns come back
                value = json.loads(patterns)
                if isinstance(value, list):
                    found[_text(name)] = [names.check_pattern(p) for p in value]
            except (ValueError, TypeError, AgentpostError) as exc:
                log.warning("durable subscription %r of %s is malformed: %s", name, agent_id, exc)
        return found

    async def save_durable(self, agent_id: str, name: str, patterns: list[str]) -> None:
        """Create (positioned at the newest topic publish) or update a durable subscription."""
        start = await self.latest("topics")
        k = self._keys
        with unavailable_on_redis_error("saving a durable subscription"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(k.durable_patterns(agent_id), name, json.dumps(patterns))
                pipe.hsetnx(k.durable_positions(agent_id), name, start)
                await pipe.execute()

    async def delete_durable(self, agent_id: str, name: str) -> bool:
        k = self._keys
        with unavailable_on_redis_error("deleting a durable subscription"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(k.durable_patterns(agent_id), name)
                pipe.hdel(k.durable_positions(agent_id), name)
                removed, _ = await pipe.execute()
        return bool(removed)
