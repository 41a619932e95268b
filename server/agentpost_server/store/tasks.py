"""Tasks in Redis.

    <prefix>:task:<id>          HASH   the task (fields: see `_record`), with version `v`
    <prefix>:task:<id>:h        STREAM its history; entry ids 0-1, 0-2... are the event seqs
    <prefix>:tq:<queue>         ZSET   tasks waiting for a target ("a:<agent>", "c:<capability>"),
                                       best first (priority, then age)
    <prefix>:tqs                SET    the waiting queues that exist
    <prefix>:tasks:open         ZSET   open tasks by creation time
    <prefix>:tasks:all          ZSET   every task by creation time (trimmed with retention)
    <prefix>:tasks:dead         ZSET   failed, rejected and expired tasks by end time
    <prefix>:tasks:load         ZSET   agent id -> tasks it holds (offered or working)
    <prefix>:ch:tasks           pub/sub: a task id, after each of its events

Every transition is one `_COMMIT` script call: a compare-and-set on the version that also writes
the history event, the audit record, the queue and load bookkeeping, the mailbox notices and the
follow-up arq jobs. Stored data is validated when read back (protobuf parsing, numbers); a
malformed task reads as missing, never evaluated. This module assumes one Redis (no Cluster):
its scripts touch keys they compute.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import DecodeError
from redis.asyncio import Redis

from agentpost.v1 import payload_pb2, tasks_pb2
from agentpost_server.core.ports import Job
from agentpost_server.core.tasks.model import Change, Committed, TaskRecord
from agentpost_server.store import jobs
from agentpost_server.store.codec import text as _text
from agentpost_server.store.codec import wait as _wait
from agentpost_server.store.errors import unavailable_on_redis_error
from agentpost_server.store.keys import Keys

# KEYS: task, history, audit, tasks channel, open, all, dead, load, queue index
# ARGV[1]: the plan (JSON, every number as a string); ARGV[2...]: the binary values it names.
_COMMIT = (
    """
local plan = cjson.decode(ARGV[1])
if plan.idem then
  local prior = redis.call('GET', plan.idem[1])
  if prior then return {'dup', prior} end
end
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '-1')
if v ~= tonumber(plan.v) then return {'conflict', tostring(v)} end
if plan.limit then
  local held = tonumber(redis.call('ZSCORE', KEYS[8], plan.limit[1]) or '0')
  if held >= tonumber(plan.limit[2]) then return {'busy', plan.limit[1]} end
end
if plan.idem then redis.call('SET', plan.idem[1], plan.id, 'PX', plan.idem[2]) end
local nv = v < 0 and 1 or v + 1
local hs = {'v', nv}
for _, f in ipairs(plan.set) do hs[#hs + 1] = f[1]; hs[#hs + 1] = ARGV[tonumber(f[2])] end
redis.call('HSET', KEYS[1], unpack(hs))
if #plan.drop > 0 then redis.call('HDEL', KEYS[1], unpack(plan.drop)) end
local seq = 0
if tonumber(plan.ev) > 0 then
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('XADD', KEYS[2], '0-' .. seq, 'e', ARGV[tonumber(plan.ev)])
end
if plan.audit then
  local a = plan.audit
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', plan.aret, '*', 'actor', a[1], 'action', a[2],
             'subject', plan.id, 't', a[3], 'd', a[4])
end
if v < 0 then
  redis.call('ZADD', KEYS[6], plan.now, plan.id)
  redis.call('ZADD', KEYS[5], plan.now, plan.id)
end
if plan.deq ~= '' then redis.call('ZREM', plan.deq, plan.id) end
if plan.enq then
  redis.call('ZADD', plan.enq[1], plan.enq[2], plan.id)
  redis.call('SADD', KEYS[9], plan.enq[1])
end
for _, l in ipairs(plan.load) do
  if tonumber(redis.call('ZINCRBY', KEYS[8], l[2], l[1])) <= 0 then
    redis.call('ZREM', KEYS[8], l[1])
  end
end
for _, m in ipairs(plan.mail) do
  redis.call('XADD', m[1], '*', 'e', ARGV[tonumber(m[2])], 'x', m[3], 'i', m[4])
end
"""
    + jobs.WRITE_JOBS
    + """
if tonumber(plan.term) > 0 then
  redis.call('ZREM', KEYS[5], plan.id)
  redis.call('PEXPIRE', KEYS[1], plan.term)
  redis.call('PEXPIRE', KEYS[2], plan.term)
  if plan.dead then redis.call('ZADD', KEYS[7], plan.now, plan.id) end
end
if seq > 0 then redis.call('PUBLISH', KEYS[4], plan.id) end
return {'ok', tostring(nv), tostring(seq), redis.call('HGETALL', KEYS[1])}
"""
)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class RedisTasks:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        retention_ms: int,
        audit_retention: int,
        idempotency_ms: int,
        retry_ms: int,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._retention_ms = retention_ms
        self._audit_retention = audit_retention
        self._idempotency_ms = idempotency_ms
        self._retry_ms = retry_ms
        self._commit = redis.register_script(_COMMIT)
        self._queue = jobs.tasks_queue(keys.prefix)

    def _task(self, task_id: str) -> str:
        return f"{self._keys.prefix}:task:{task_id}"

    def _idem(self, sender: str, key: str) -> str:
        return f"{self._keys.prefix}:tidem:{sender}:{key}"

    async def by_key(self, sender: str, key: str) -> str | None:
        """The task a sender handed off under an idempotency key, if any."""
        with unavailable_on_redis_error("looking up the task"):
            found = await _wait(self._redis.get(self._idem(sender, key)))
        return _text(found) if found else None

    def _waiting(self, queue: str) -> str:
        return f"{self._keys.prefix}:tq:{queue}"

    def _list(self, name: str) -> str:
        return f"{self._keys.prefix}:tasks:{name}"

    async def load(self, task_id: str) -> TaskRecord | None:
        with unavailable_on_redis_error("reading the task"):
            raw = await _wait(self._redis.hgetall(self._task(task_id)))
        return _record(task_id, raw)

    async def load_many(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        if not task_ids:
            return []
        with unavailable_on_redis_error("reading tasks"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    pipe.hgetall(self._task(task_id))
                raws = await pipe.execute()
        found = (_record(task_id, raw) for task_id, raw in zip(task_ids, raws, strict=True))
        return [record for record in found if record is not None]

    async def commit(
        self,
        task_id: str,
        version: int,
        change: Change,
        *,
        idempotency: tuple[str, str] | None = None,
    ) -> Committed | str | None:
        """Apply `change` if the task is still at `version` (-1: create it) and the agent of
        `change.limit` holds fewer tasks than its limit. Returns what was committed, None on a
        version conflict (or a full agent), or (creating with an idempotency key that was used
        before) the earlier task's id."""
        k = self._keys
        now = _now_ms()
        blobs: list[bytes | str] = []

        def blob(value: bytes | str) -> str:
            blobs.append(value)
            return str(len(blobs) + 1)  # ARGV index (ARGV[1] is the plan)

        plan: dict[str, Any] = {
            "v": str(version),
            "id": task_id,
            "now": str(now),
            "set": [[name, blob(value)] for name, value in change.fields.items()],
            "drop": change.drop,
            "ev": blob(change.event.SerializeToString()) if change.event is not None else "0",
            "aret": str(self._audit_retention),
            "deq": self._waiting(change.dequeue) if change.dequeue else "",
            "load": [[agent, str(delta)] for agent, delta in change.load.items() if delta],
            "mail": [
                [
                    k.mailbox(m.agent_id),
                    blob(m.envelope.SerializeToString()),
                    str(m.expires_ms),
                    m.envelope.id,
                ]
                for m in change.mail
            ],
            "jobs": jobs.plan_entries(change.jobs, self._queue, blob),
            "term": str(self._retention_ms) if change.terminal else "0",
            "dead": change.dead,
        }
        if change.action:
            plan["audit"] = [
                change.actor,
                change.action,
                str(now),
                json.dumps(dict(change.details)),
            ]
        if change.limit is not None:
            plan["limit"] = [change.limit[0], str(change.limit[1])]
        if change.enqueue:
            plan["enq"] = [self._waiting(change.enqueue), repr(change.score)]
        if idempotency is not None:
            sender, key = idempotency
            keep = self._retry_ms if key.startswith("~") else self._idempotency_ms
            plan["idem"] = [self._idem(sender, key), str(keep)]
        keys = [
            self._task(task_id),
            self._task(task_id) + ":h",
            k.audit,
            k.tasks_channel,
            self._list("open"),
            self._list("all"),
            self._list("dead"),
            self._list("load"),
            f"{k.prefix}:tqs",
        ]
        with unavailable_on_redis_error("storing the task"):
            result = await self._commit(keys=keys, args=[json.dumps(plan), *blobs])
        status = _text(result[0])
        if status == "ok":
            flat = result[3]
            stored = _record(task_id, dict(zip(flat[::2], flat[1::2], strict=True)))
            return Committed(version=int(result[1]), seq=int(result[2]), record=stored)
        if status == "dup":
            return _text(result[1])
        return None

    async def history(self, task_id: str, after_seq: int, limit: int) -> list[tasks_pb2.TaskEvent]:
        with unavailable_on_redis_error("reading the task history"):
            raw = await _wait(
                self._redis.xrange(self._task(task_id) + ":h", f"(0-{after_seq}", "+", count=limit)
            )
        events = []
        for entry_id, fields in raw:
            event = _event(_text(entry_id), fields)
            if event is not None:
                event.task_id = task_id
                events.append(event)
        return events

    async def schedule(self, job: Job) -> None:
        """Queue one job outside a transition (a liveness re-check)."""
        s = jobs.stored(job, self._queue)
        with unavailable_on_redis_error("scheduling a task check"):
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.set(s.job_key, s.data, px=s.expires_ms, nx=True)
                pipe.zadd(s.queue, {job.job_id: s.score_ms}, nx=True)
                await pipe.execute()

    async def waiting(self, queue: str, limit: int) -> list[str]:
        with unavailable_on_redis_error("reading the waiting tasks"):
            raw = await _wait(self._redis.zrange(self._waiting(queue), 0, limit - 1))
        return [_text(member) for member in raw]

    async def queues(self) -> list[str]:
        """The waiting queues that have tasks (emptied ones are forgotten)."""
        index = f"{self._keys.prefix}:tqs"
        prefix = f"{self._keys.prefix}:tq:"
        with unavailable_on_redis_error("listing the waiting queues"):
            names = [_text(n) for n in await _wait(self._redis.smembers(index))]
            found = []
            for name in names:
                if await _wait(self._redis.zcard(name)):
                    found.append(name.removeprefix(prefix))
                else:
                    await _wait(self._redis.srem(index, name))
        return found

    async def loads(self, agent_ids: Sequence[str]) -> list[int]:
        if not agent_ids:
            return []
        with unavailable_on_redis_error("reading the task load"):
            raw = await _wait(self._redis.zmscore(self._list("load"), list(agent_ids)))
        return [int(value or 0) for value in raw]

    async def ids(self, which: str, limit: int, offset: int = 0) -> list[str]:
        """Task ids, newest first: "all", "open" or "dead"."""
        with unavailable_on_redis_error("listing tasks"):
            raw = await _wait(self._redis.zrevrange(self._list(which), offset, offset + limit - 1))
        return [_text(member) for member in raw]

    async def open_since(self, before_ms: int, limit: int) -> list[str]:
        """Open tasks created before `before_ms`, oldest first (for the sweep)."""
        with unavailable_on_redis_error("listing open tasks"):
            raw = await _wait(
                self._redis.zrangebyscore(self._list("open"), "-inf", before_ms, 0, limit)
            )
        return [_text(member) for member in raw]

    async def trim(self, before_ms: int) -> None:
        """Forget index entries older than the retention (their tasks have expired)."""
        with unavailable_on_redis_error("trimming the task index"):
            await _wait(self._redis.zremrangebyscore(self._list("all"), "-inf", before_ms))
            await _wait(self._redis.zremrangebyscore(self._list("dead"), "-inf", before_ms))


def _int(fields: dict[str, bytes], name: str) -> int:
    raw = fields.get(name)
    return int(raw) if raw else 0


def _record(task_id: str, raw: dict[Any, Any]) -> TaskRecord | None:
    if not raw:
        return None
    fields = {_text(key): value for key, value in raw.items()}
    try:
        state = _int(fields, "state")
        if state not in tasks_pb2.TaskState.values():
            return None
        spec = tasks_pb2.TaskSpec.FromString(fields.get("spec", b""))
        record = TaskRecord(
            id=task_id,
            version=_int(fields, "v"),
            seq=_int(fields, "seq"),
            originator=_text(fields.get("originator", b"")),
            state=state,
            spec=spec,
            assignee=_text(fields.get("assignee", b"")),
            attempt=_int(fields, "attempt"),
            max_attempts=_int(fields, "max_attempts") or 1,
            accept_ms=_int(fields, "accept_ms"),
            deadline_ms=_int(fields, "deadline_ms"),
            created_ms=_int(fields, "created_ms"),
            updated_ms=_int(fields, "updated_ms"),
            offered_ms=_int(fields, "offered_ms"),
            not_before_ms=_int(fields, "not_before_ms"),
            ticks=_int(fields, "ticks"),
            error=_text(fields.get("error", b"")),
            retryable=fields.get("retryable") == b"1",
            queued=fields.get("queued") == b"1",
            tried=_text(fields.get("tried", b"")).split(),
            rejected_by=_text(fields.get("rejected_by", b"")).split(),
            workflow_run_id=_text(fields.get("wf_run", b"")),
            workflow_step_id=_text(fields.get("wf_step", b"")),
            workflow_attempt=_int(fields, "wf_att"),
            on_done=_text(fields.get("on_done", b"")),
        )
        if "result" in fields:
            record.result = payload_pb2.Payload.FromString(fields["result"])
    except (DecodeError, ValueError, UnicodeDecodeError):
        return None
    return record


def _event(entry_id: str, fields: dict[Any, Any]) -> tasks_pb2.TaskEvent | None:
    try:
        event = tasks_pb2.TaskEvent.FromString(fields.get(b"e", b""))
        event.seq = int(entry_id.partition("-")[2])
    except (DecodeError, ValueError):
        return None
    return event
