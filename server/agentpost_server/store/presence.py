"""The presence registry in Redis (see `Keys` for the layout). Session changes are Lua scripts so
that "first session -> online" and "last session -> offline" are decided atomically."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format
from redis.asyncio import Redis

from agentpost.v1 import agents_pb2
from agentpost_server.core.ports import AgentRecord, PresenceChange
from agentpost_server.store.codec import text as _text
from agentpost_server.store.codec import wait as _wait
from agentpost_server.store.errors import unavailable_on_redis_error
from agentpost_server.store.keys import Keys

log = logging.getLogger(__name__)

# Makes an agent known: its record, its mailbox's consumer group, and its broadcast position
# (the newest broadcast now, so a new agent gets no history). Shared by _ADD and _REGISTER.
# KEYS: agent, agents, mailbox, broadcast log; ARGV: agent_id, capabilities, metadata, now_ms
_KNOW = """
local function know(agent, agents, mailbox, log, agent_id, capabilities, metadata, now)
  redis.call('SADD', agents, agent_id)
  local prefix = string.sub(agents, 1, #agents - 7)
  local old = redis.call('HGET', agent, 'capabilities')
  local ok, listed = pcall(cjson.decode, old or '[]')
  if ok and type(listed) == 'table' then  -- a malformed stored list is skipped, not trusted
    for _, c in ipairs(listed) do
      if type(c) == 'string' then redis.call('SREM', prefix .. ':cap:' .. c, agent_id) end
    end
  end
  for _, c in ipairs(cjson.decode(capabilities)) do
    redis.call('SADD', prefix .. ':cap:' .. c, agent_id)
  end
  redis.call('HSET', agent, 'capabilities', capabilities, 'metadata', metadata)
  redis.call('HSETNX', agent, 'first_seen', now)
  if redis.call('HEXISTS', agent, 'bpos') == 0 then
    local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
    redis.call('HSET', agent, 'bpos', last[1] and last[1][1] or '0-0')
  end
  pcall(redis.call, 'XGROUP', 'CREATE', mailbox, 'g', '0', 'MKSTREAM')
end
"""

_REGISTER = (
    _KNOW
    + """
know(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
return 1
"""
)

# KEYS: agent, agent_sessions, server_sessions, agents, servers, mailbox, broadcast log
# ARGV: session_id, "server_id instance_id", agent_id, capabilities_json, metadata_json, now_ms,
#       server_id, max_tasks
_ADD = (
    _KNOW
    + """
know(KEYS[1], KEYS[4], KEYS[6], KEYS[7], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
redis.call('HSET', KEYS[1], 'max_tasks', ARGV[8])
local before = redis.call('HLEN', KEYS[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('SADD', KEYS[5], ARGV[7])
redis.call('HSET', KEYS[1], 'last_seen', ARGV[6])
if before == 0 then
  redis.call('HSET', KEYS[1], 'connected_since', ARGV[6])
  return 1
end
return 0
"""
)

# KEYS: agent, agent_sessions, server_sessions; ARGV: session_id, now_ms
_REMOVE = """
local removed = redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if removed == 1 then
  redis.call('HSET', KEYS[1], 'last_seen', ARGV[2])
  if redis.call('HLEN', KEYS[2]) == 0 then
    redis.call('HDEL', KEYS[1], 'connected_since')
    return 1
  end
end
return 0
"""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class RedisPresence:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._add = redis.register_script(_ADD)
        self._remove = redis.register_script(_REMOVE)
        self._register = redis.register_script(_REGISTER)

    async def add_session(
        self, agent: AgentRecord, session_id: str, server_id: str, instance_id: str
    ) -> bool:
        k = self._keys
        a = agent.agent_id
        with unavailable_on_redis_error("registering the session"):
            result = await self._add(
                keys=[
                    k.agent(a),
                    k.agent_sessions(a),
                    k.server_sessions(server_id),
                    k.agents,
                    k.servers,
                    k.mailbox(a),
                    k.broadcast_log,
                ],
                args=[
                    session_id,
                    f"{server_id} {instance_id}",
                    a,
                    json.dumps(list(agent.capabilities)),
                    json.dumps(dict(agent.metadata)),
                    _now_ms(),
                    server_id,
                    agent.max_tasks,
                ],
            )
        return bool(result)

    async def register(self, agent: AgentRecord) -> None:
        k = self._keys
        a = agent.agent_id
        with unavailable_on_redis_error("registering the agent"):
            await self._register(
                keys=[k.agent(a), k.agents, k.mailbox(a), k.broadcast_log],
                args=[
                    a,
                    json.dumps(list(agent.capabilities)),
                    json.dumps(dict(agent.metadata)),
                    _now_ms(),
                ],
            )

    async def is_known(self, agent_id: str) -> bool:
        with unavailable_on_redis_error("looking up the agent"):
            return bool(await _wait(self._redis.sismember(self._keys.agents, agent_id)))

    async def online(self, agent_id: str) -> bool | None:
        """Whether the agent has a live session; None when it is not known at all."""
        k = self._keys
        with unavailable_on_redis_error("looking up the agent"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.sismember(k.agents, agent_id)
                pipe.hlen(k.agent_sessions(agent_id))
                known, sessions = await pipe.execute()
        return bool(sessions) if known else None

    async def capable(self, capability: str) -> list[tuple[str, bool]]:
        """(agent id, online) of every agent advertising the capability, sorted by id."""
        k = self._keys
        with unavailable_on_redis_error("looking up capable agents"):
            members = sorted(
                _text(m) for m in await _wait(self._redis.smembers(k.capability(capability)))
            )
            if not members:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for agent_id in members:
                    pipe.hlen(k.agent_sessions(agent_id))
                sessions = await pipe.execute()
        return [(agent_id, bool(n)) for agent_id, n in zip(members, sessions, strict=True)]

    async def task_limits(self, agent_ids: Sequence[str]) -> list[int]:
        k = self._keys
        with unavailable_on_redis_error("looking up task limits"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for agent_id in agent_ids:
                    pipe.hget(k.agent(agent_id), "max_tasks")
                raw = await pipe.execute()
        limits = []
        for value in raw:
            text = _text(value) if value else "0"
            limits.append(int(text) if text.isdigit() else 0)
        return limits

    async def remove_session(self, agent_id: str, session_id: str, server_id: str) -> bool:
        k = self._keys
        with unavailable_on_redis_error("unregistering the session"):
            result = await self._remove(
                keys=[k.agent(agent_id), k.agent_sessions(agent_id), k.server_sessions(server_id)],
                args=[session_id, _now_ms()],
            )
        return bool(result)

    async def sessions_of(self, agent_id: str) -> dict[str, str]:
        """session id -> server id."""
        return {s: server for s, (server, _) in (await self._sessions(agent_id)).items()}

    async def live_instances(self, agent_id: str) -> set[str]:
        return {instance for _, instance in (await self._sessions(agent_id)).values()}

    async def _sessions(self, agent_id: str) -> dict[str, tuple[str, str]]:
        with unavailable_on_redis_error("looking up the agent's sessions"):
            raw = await _wait(self._redis.hgetall(self._keys.agent_sessions(agent_id)))
        found = {}
        for session, value in raw.items():
            server, _, instance = _text(value).partition(" ")
            found[_text(session)] = (server, instance)
        return found

    async def get_agent(self, agent_id: str) -> agents_pb2.AgentInfo | None:
        found = await self._load([agent_id])
        return found[0] if found else None

    async def list_agents(self, capability: str, online: bool | None) -> list[agents_pb2.AgentInfo]:
        with unavailable_on_redis_error("listing agents"):
            index = self._keys.capability(capability) if capability else self._keys.agents
            ids = sorted(_text(a) for a in await _wait(self._redis.smembers(index)))
        agents = await self._load(ids)
        return [
            a
            for a in agents
            if (not capability or capability in a.capabilities)
            and (online is None or a.online == online)
        ]

    async def heartbeat(self, server_id: str, agent_ids: Sequence[str], ttl_seconds: float) -> bool:
        """Refresh this server's liveness and its agents' last-seen. True if the server was not
        registered (it is new, or it was reaped as dead while it was in fact alive)."""
        k = self._keys
        now = _now_ms()
        with unavailable_on_redis_error("the heartbeat"):
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(k.server_alive(server_id), now, px=int(ttl_seconds * 1000))
                pipe.sadd(k.servers, server_id)
                for agent_id in agent_ids:
                    pipe.hset(k.agent(agent_id), "last_seen", str(now))
                results = await pipe.execute()
        return bool(results[1])

    async def reap_dead_servers(self) -> list[tuple[PresenceChange, bool]]:
        """Remove the sessions of servers whose heartbeat expired. Returns each removed session
        and whether its agent went offline with it."""
        k = self._keys
        removed: list[tuple[PresenceChange, bool]] = []
        with unavailable_on_redis_error("reaping dead servers"):
            for raw_server in await _wait(self._redis.smembers(k.servers)):
                server_id = _text(raw_server)
                if await self._redis.exists(k.server_alive(server_id)):
                    continue
                sessions = await _wait(self._redis.hgetall(k.server_sessions(server_id)))
                for raw_session, raw_agent in sessions.items():
                    session_id, agent_id = _text(raw_session), _text(raw_agent)
                    offline = await self.remove_session(agent_id, session_id, server_id)
                    removed.append(
                        (PresenceChange(agent_id, session_id, server_id, False), offline)
                    )
                await self._redis.delete(k.server_sessions(server_id))
                await _wait(self._redis.srem(k.servers, server_id))
        return removed

    async def ping(self) -> None:
        with unavailable_on_redis_error("ping"):
            await self._redis.ping()

    async def _load(self, agent_ids: Sequence[str]) -> list[agents_pb2.AgentInfo]:
        if not agent_ids:
            return []
        k = self._keys
        with unavailable_on_redis_error("reading agents"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for agent_id in agent_ids:
                    pipe.hgetall(k.agent(agent_id))
                    pipe.hlen(k.agent_sessions(agent_id))
                    pipe.xlen(k.mailbox(agent_id))
                results = await pipe.execute()
        agents = []
        for index, agent_id in enumerate(agent_ids):
            fields, sessions, pending = results[3 * index : 3 * index + 3]
            if fields:
                info = _agent_info(agent_id, fields, int(sessions))
                info.pending = int(pending)
                agents.append(info)
        return agents


def _agent_info(agent_id: str, raw: dict[Any, Any], sessions: int) -> agents_pb2.AgentInfo:
    fields = {_lenient(key): _lenient(value) for key, value in raw.items()}
    info = agents_pb2.AgentInfo(agent_id=agent_id, online=sessions > 0, sessions=sessions)
    # Validated on the way out: a malformed field is left empty (and logged), never evaluated.
    try:
        capabilities = json.loads(fields.get("capabilities") or "[]")
        if isinstance(capabilities, list):
            info.capabilities.extend(str(c) for c in capabilities)
        metadata = json.loads(fields.get("metadata") or "{}")
        if isinstance(metadata, dict):
            json_format.ParseDict(metadata, info.metadata)
    except (ValueError, TypeError, json_format.ParseError) as exc:
        log.warning("agent %s has a malformed stored record: %s", agent_id, exc)
        del info.capabilities[:]
        info.metadata.Clear()
    for name in ("connected_since", "last_seen", "first_seen"):
        value = fields.get(name)
        if value and value.isdigit() and (name != "connected_since" or sessions > 0):
            getattr(info, name).FromMilliseconds(int(value))
    max_tasks = fields.get("max_tasks", "")
    if max_tasks.isdigit() and int(max_tasks) < 1 << 31:
        info.max_tasks = int(max_tasks)
    return info


def _lenient(value: Any) -> str:
    """Stored text, with undecodable bytes replaced (they are then refused as JSON)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
