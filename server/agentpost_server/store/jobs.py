"""arq's storage format, behind one small interface of ours.

Task transitions schedule their follow-up checks (accept timeout, deadline, assignee liveness,
retry backoff) as arq jobs written by the same Lua script that commits the transition, so a
transition and its timer are stored atomically: no crash can leave a task waiting with no job to
move it on. This module turns a `core.ports.Job` into what arq's `enqueue_job` would store (the
job key with its expiry, and the queue member with its score) using arq's own `serialize_job`
with our JSON serializer (never pickle). Nothing else in agentpost knows arq's key layout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from arq.constants import expires_extra_ms, job_key_prefix
from arq.jobs import serialize_job

from agentpost_server.core.ports import Job


def dumps(value: Any) -> bytes:
    """The job serializer (JSON)."""
    return json.dumps(value, separators=(",", ":")).encode()


def loads(raw: bytes) -> Any:
    """The job deserializer (JSON)."""
    return json.loads(raw)


def tasks_queue(prefix: str) -> str:
    """The arq queue of task jobs: short jobs, polled often (see `jobs.worker`)."""
    return f"{prefix}:tasks"


@dataclass(frozen=True, slots=True)
class StoredJob:
    job_key: str
    queue: str
    score_ms: int
    expires_ms: int
    data: bytes


def stored(job: Job, queue: str) -> StoredJob:
    now = time.time_ns() // 1_000_000
    run_at = max(job.run_at_ms, now)
    data = serialize_job(job.function, tuple(job.args), {}, None, now, serializer=dumps)
    return StoredJob(
        job_key=job_key_prefix + job.job_id,
        queue=queue,
        score_ms=run_at,
        expires_ms=run_at - now + expires_extra_ms,
        data=data,
    )


# Lua, for a script whose plan (JSON) carries `jobs` as made by `plan_entries`: queue each job
# as arq's enqueue_job would, unless a job with its id exists already.
WRITE_JOBS = """
for _, j in ipairs(plan.jobs) do
  if redis.call('EXISTS', j[1]) == 0 then
    redis.call('PSETEX', j[1], j[4], ARGV[tonumber(j[5])])
    redis.call('ZADD', j[2], j[3], j[6])
  end
end
"""


def plan_entries(
    to_schedule: Sequence[Job], queue: str, blob: Callable[[bytes], str]
) -> list[list[str]]:
    """The `jobs` of a script's plan; `blob` passes the job data as an ARGV and names it."""
    entries = []
    for job in to_schedule:
        s = stored(job, queue)
        entries.append(
            [s.job_key, s.queue, str(s.score_ms), str(s.expires_ms), blob(s.data), job.job_id]
        )
    return entries
