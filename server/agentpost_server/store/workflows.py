"""Workflow runs in Redis.

    <prefix>:wf:<run id>        HASH   run (WorkflowRun bytes), v (version), and p:<version>:<n>
                                       for each action still to carry out (JSON)
    <prefix>:wf:<run id>:ev     STREAM the run's events; entry ids 0-1, 0-2... are their seqs
    <prefix>:wfs                ZSET   run ids by creation time
    <prefix>:ch:wf              pub/sub: a run id, after each commit with events

A transition is one `_COMMIT` call: a compare-and-set on the version that stores the new state,
appends its events, records the actions still to carry out and schedules its timers (arq jobs)
atomically. Runs are validated when read back (protobuf parsing); nothing is evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import DecodeError
from redis.asyncio import Redis

from agentpost.v1 import workflows_pb2
from agentpost_server.core.ports import Job
from agentpost_server.store import jobs
from agentpost_server.store.codec import text as _text
from agentpost_server.store.codec import wait as _wait
from agentpost_server.store.errors import unavailable_on_redis_error
from agentpost_server.store.keys import Keys

# KEYS: run, events, index, channel; ARGV[1]: plan JSON; ARGV[2...]: blobs it names.
_COMMIT = (
    """
local plan = cjson.decode(ARGV[1])
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '-1')
if v ~= tonumber(plan.v) then return {'conflict', tostring(v)} end
local nv = v < 0 and 1 or v + 1
redis.call('HSET', KEYS[1], 'v', nv, 'run', ARGV[tonumber(plan.run)])
for i, p in ipairs(plan.pend) do
  redis.call('HSET', KEYS[1], string.format('p:%012d:%04d', nv, i), ARGV[tonumber(p)])
end
for _, e in ipairs(plan.events) do
  redis.call('XADD', KEYS[2], '0-' .. e[1], 'e', ARGV[tonumber(e[2])])
end
"""
    + jobs.WRITE_JOBS
    + """
if v < 0 then redis.call('ZADD', KEYS[3], plan.now, plan.id) end
if tonumber(plan.term) > 0 then
  redis.call('PEXPIRE', KEYS[1], plan.term)
  redis.call('PEXPIRE', KEYS[2], plan.term)
end
if #plan.events > 0 then redis.call('PUBLISH', KEYS[4], plan.id) end
return {'ok', tostring(nv)}
"""
)

# KEYS: run; ARGV: the version up to which pending actions are done
_DONE = """
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  local v = string.match(f, '^p:(%d+):')
  if v and tonumber(v) <= tonumber(ARGV[1]) then redis.call('HDEL', KEYS[1], f) end
end
return 1
"""


class RedisWorkflows:
    def __init__(self, redis: Redis, keys: Keys, *, retention_ms: int) -> None:
        self._redis = redis
        self._keys = keys
        self._retention_ms = retention_ms
        self._commit = redis.register_script(_COMMIT)
        self._done = redis.register_script(_DONE)
        self._queue = jobs.tasks_queue(keys.prefix)

    def _run(self, run_id: str) -> str:
        return f"{self._keys.prefix}:wf:{run_id}"

    async def load(self, run_id: str) -> tuple[workflows_pb2.WorkflowRun, int, list[str]] | None:
        """(run, version, the pending actions' JSON in order), or None."""
        with unavailable_on_redis_error("reading the workflow run"):
            raw = await _wait(self._redis.hgetall(self._run(run_id)))
        if not raw:
            return None
        fields = {_text(key): value for key, value in raw.items()}
        try:
            run = workflows_pb2.WorkflowRun.FromString(fields.get("run", b""))
            version = int(fields.get("v") or 0)
            pending = [_text(fields[name]) for name in sorted(fields) if name.startswith("p:")]
        except (DecodeError, ValueError, UnicodeDecodeError):
            return None
        return run, version, pending

    async def commit(
        self,
        run_id: str,
        version: int,
        run: workflows_pb2.WorkflowRun,
        events: Sequence[workflows_pb2.WorkflowEvent],
        *,
        pending: Sequence[str],
        jobs_to_schedule: Sequence[Job],
        terminal: bool,
        now_ms: int,
    ) -> int | None:
        """The new version, or None when the run changed since `version` (-1: create it)."""
        blobs: list[bytes | str] = []

        def blob(value: bytes | str) -> str:
            blobs.append(value)
            return str(len(blobs) + 1)

        plan: dict[str, Any] = {
            "v": str(version),
            "id": run_id,
            "now": str(now_ms),
            "run": blob(run.SerializeToString()),
            "pend": [blob(action) for action in pending],
            "events": [[str(e.seq), blob(e.SerializeToString())] for e in events],
            "jobs": jobs.plan_entries(jobs_to_schedule, self._queue, blob),
            "term": str(self._retention_ms) if terminal else "0",
        }
        keys = [
            self._run(run_id),
            self._run(run_id) + ":ev",
            f"{self._keys.prefix}:wfs",
            self._keys.workflows_channel,
        ]
        with unavailable_on_redis_error("storing the workflow run"):
            result = await self._commit(keys=keys, args=[json.dumps(plan), *blobs])
        return int(result[1]) if _text(result[0]) == "ok" else None

    async def pending_done(self, run_id: str, up_to_version: int) -> None:
        with unavailable_on_redis_error("storing the workflow run"):
            await self._done(keys=[self._run(run_id)], args=[str(up_to_version)])

    async def events(
        self, run_id: str, after_seq: int, limit: int
    ) -> list[workflows_pb2.WorkflowEvent]:
        with unavailable_on_redis_error("reading the workflow events"):
            raw = await _wait(
                self._redis.xrange(self._run(run_id) + ":ev", f"(0-{after_seq}", "+", count=limit)
            )
        found = []
        for entry_id, fields in raw:
            try:
                event = workflows_pb2.WorkflowEvent.FromString(fields.get(b"e", b""))
                event.seq = int(_text(entry_id).partition("-")[2])
            except (DecodeError, ValueError):
                continue
            found.append(event)
        return found

    async def trim(self, before_ms: int) -> None:
        """Forget index entries older than the retention (finished runs have expired)."""
        with unavailable_on_redis_error("trimming the workflow index"):
            await _wait(self._redis.zremrangebyscore(f"{self._keys.prefix}:wfs", "-inf", before_ms))

    async def ids(self, limit: int, offset: int = 0) -> list[str]:
        """Run ids, newest first."""
        with unavailable_on_redis_error("listing workflow runs"):
            raw = await _wait(
                self._redis.zrevrange(f"{self._keys.prefix}:wfs", offset, offset + limit - 1)
            )
        return [_text(member) for member in raw]
