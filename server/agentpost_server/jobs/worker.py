"""The arq worker: background jobs that must run exactly once across every server process.

arq stays behind this module: the rest of the server knows `build_workers` and `run_workers`.
Jobs are JSON-serialized (never pickle). Two queues, each with its own arq Worker in the process:

"<key prefix>:jobs" (maintenance):
- `reap_dead_servers` (cron, every `reap_interval` seconds): remove the sessions of server
  processes whose heartbeat expired, so their agents show offline.
- `sweep_mailboxes` (cron, every `sweep_interval` seconds): move messages past their TTL or
  older than the mailbox age limit to the dead letters.

"<key prefix>:tasks" (task handoffs; short jobs, polled every 50 ms):
- `task_tick` (scheduled by task transitions, see `store.jobs`): one check of one task.
- `task_sweep` (cron, every 5 s): offer waiting tasks whose target came online unnoticed.
- `workflow_step_done` (a step's task ended), `workflow_retry`, `workflow_timeout` and
  `workflow_kick` (actions a crashed process left pending): see `core.workflows.driver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from arq import cron
from arq.connections import RedisSettings
from arq.worker import Retry, Worker, func

from agentpost.errors import UnavailableError
from agentpost_server import compose
from agentpost_server.core.ids import UlidFactory
from agentpost_server.core.reaper import reap, sweep
from agentpost_server.core.tasks.service import TaskService
from agentpost_server.settings import Settings
from agentpost_server.store import jobs
from agentpost_server.store.bus import RedisBus
from agentpost_server.store.keys import Keys
from agentpost_server.store.mailbox import RedisMailboxes
from agentpost_server.store.presence import RedisPresence
from agentpost_server.store.writer import PipelineWriter

log = logging.getLogger(__name__)


async def reap_dead_servers(ctx: dict[str, Any]) -> int:
    return await reap(ctx["presence"], ctx["bus"], ctx["ids"])


async def sweep_mailboxes(ctx: dict[str, Any]) -> int:
    return await sweep(ctx["presence"], ctx["mailboxes"], max_age_ms=ctx["max_age_ms"])


@contextlib.contextmanager
def _retry_while_unavailable() -> Iterator[None]:
    """Redis is away: arq runs the job again in 2 s (its max_tries is high)."""
    try:
        yield
    except UnavailableError as exc:
        raise Retry(defer=2) from exc


async def task_tick(ctx: dict[str, Any], task_id: str) -> None:
    """A task's scheduled check (accept timeout, backoff elapsed, liveness, deadline)."""
    with _retry_while_unavailable():
        await ctx["tasks"].tick(task_id)


async def workflow_step_done(ctx: dict[str, Any], task_id: str) -> None:
    """A workflow step's task ended (its on_done continuation)."""
    with _retry_while_unavailable():
        await ctx["workflows"].on_task_done(task_id)


async def workflow_retry(ctx: dict[str, Any], run_id: str, step_id: str, attempt: str) -> None:
    with _retry_while_unavailable():
        await ctx["workflows"].on_retry_due(run_id, step_id, int(attempt))


async def workflow_timeout(ctx: dict[str, Any], run_id: str) -> None:
    with _retry_while_unavailable():
        await ctx["workflows"].on_run_timeout(run_id)


async def workflow_kick(ctx: dict[str, Any], run_id: str) -> None:
    """Carry out a run's actions that a crashed process left pending."""
    with _retry_while_unavailable():
        await ctx["workflows"].kick(run_id)


async def task_sweep(ctx: dict[str, Any]) -> int:
    """Offer waiting tasks whose target came online unnoticed; forget index entries of tasks
    and workflow runs past their retention (a run still running then stays readable by id)."""
    service: TaskService = ctx["tasks"]
    offered = await service.sweep()
    before = _now_ms() - ctx["task_retention_ms"]
    await ctx["task_store"].trim(before)
    await ctx["workflows"].store.trim(before)
    return offered


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def build_workers(settings: Settings, redis_url: str) -> list[Worker]:
    """The maintenance worker (queue "<prefix>:jobs") and the task worker ("<prefix>:tasks":
    short jobs polled often, so that a killed worker's job is retried within seconds)."""
    return [_maintenance(settings, redis_url), _tasks(settings, redis_url)]


async def _common(ctx: dict[str, Any], settings: Settings, keys: Keys) -> None:
    redis = ctx["redis"]
    writer = PipelineWriter(redis)
    writer.start()
    bus = RedisBus(redis, keys, "worker", writer)
    presence = RedisPresence(redis, keys)
    ctx.update(bus=bus, writer=writer, presence=presence, ids=UlidFactory(), keys=keys)


async def _shutdown(ctx: dict[str, Any]) -> None:
    for service in (ctx.get("workflows"), ctx.get("tasks")):
        if service is not None:
            await service.close()
    writer = ctx.get("writer")
    if writer is not None:
        await writer.close()


def _maintenance(settings: Settings, redis_url: str) -> Worker:
    keys = Keys(settings.key_prefix)

    async def startup(ctx: dict[str, Any]) -> None:
        await _common(ctx, settings, keys)
        ctx.update(
            mailboxes=RedisMailboxes(
                ctx["redis"],
                keys,
                ctx["writer"],
                max_len=settings.mailbox_max_messages,
                idempotency_ms=int(settings.idempotency_window * 1000),
                retry_ms=int(settings.retry_window * 1000),
            ),
            max_age_ms=int(settings.mailbox_max_age * 1000),
        )

    every = max(1, round(settings.reap_interval))
    sweep_every = max(1, min(59, round(settings.sweep_interval)))
    return Worker(
        functions=[],
        cron_jobs=[
            cron(
                reap_dead_servers,
                name="reap_dead_servers",
                second=set(range(0, 60, every)),
                run_at_startup=True,
                unique=True,
                timeout=30,
            ),
            cron(
                sweep_mailboxes,
                name="sweep_mailboxes",
                second=set(range(0, 60, sweep_every)),
                run_at_startup=True,
                unique=True,
                timeout=300,
            ),
        ],
        redis_settings=RedisSettings.from_dsn(redis_url),
        queue_name=f"{settings.key_prefix}:jobs",
        on_startup=startup,
        on_shutdown=_shutdown,
        job_serializer=jobs.dumps,
        job_deserializer=jobs.loads,
        handle_signals=False,
        poll_delay=0.5,
        health_check_key=f"{settings.key_prefix}:jobs:health",
    )


def _tasks(settings: Settings, redis_url: str) -> Worker:
    keys = Keys(settings.key_prefix)

    async def startup(ctx: dict[str, Any]) -> None:
        await _common(ctx, settings, keys)
        service = compose.tasks(settings, ctx["redis"], keys, ctx["presence"], ctx["bus"].wake)
        ctx.update(
            tasks=service,
            workflows=compose.workflows(settings, ctx["redis"], keys, service),
            task_store=service.store,
            task_retention_ms=int(settings.task_retention * 1000),
        )

    return Worker(
        functions=[
            func(job, name=job.__name__, timeout=10, max_tries=1000)
            for job in (
                task_tick,
                workflow_step_done,
                workflow_retry,
                workflow_timeout,
                workflow_kick,
            )
        ],
        cron_jobs=[
            cron(
                task_sweep,
                name="task_sweep",
                second=set(range(0, 60, 5)),
                run_at_startup=True,
                unique=True,
                timeout=10,
            )
        ],
        redis_settings=RedisSettings.from_dsn(redis_url),
        queue_name=jobs.tasks_queue(settings.key_prefix),
        on_startup=startup,
        on_shutdown=_shutdown,
        job_serializer=jobs.dumps,
        job_deserializer=jobs.loads,
        handle_signals=False,
        poll_delay=0.05,
        keep_result=0,
        max_jobs=100,
        health_check_key=f"{settings.key_prefix}:tasks:health",
    )


async def run_workers(workers: list[Worker]) -> None:
    """Run in-process workers until cancelled, then close them (and their Redis pools)."""
    try:
        await asyncio.gather(*(worker.main() for worker in workers))
    finally:
        for worker in workers:
            await _close(worker)


async def _close(worker: Worker) -> None:
    """What arq's `Worker.close()` does, in an order that survives cancellation: its close()
    gathers the cancelled job tasks without `return_exceptions` and so raises before the
    shutdown hook runs and the pool closes (leaking connections, with jobs still writing
    their outcome afterwards). Here the jobs are cancelled and waited for (they record their
    outcome on the pool), then the hook runs and the pool is closed."""
    jobs = list(worker.tasks.values())
    for job in jobs:
        job.cancel()
    await asyncio.gather(*jobs, return_exceptions=True)
    pool = worker._pool
    if pool is None:
        return
    try:
        if worker.on_shutdown is not None:
            await worker.on_shutdown(worker.ctx)
    finally:
        worker._pool = None
        await pool.aclose(close_connection_pool=True)
