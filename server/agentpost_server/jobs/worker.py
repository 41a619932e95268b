"""The arq worker: background jobs that must run exactly once across every server process.

arq stays behind this module: the rest of the server knows `build_worker` and `run_worker`.
Jobs are JSON-serialized (never pickle). Queue name: "<key prefix>:jobs".

Jobs so far:
- `reap_dead_servers` (cron, every `reap_interval` seconds): remove the sessions of server
  processes whose heartbeat expired, so their agents show offline.
- `sweep_mailboxes` (cron, every `sweep_interval` seconds): move messages past their TTL or
  older than the mailbox age limit to the dead letters.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

from arq import cron
from arq.connections import RedisSettings
from arq.worker import Worker

from agentpost_server.core.ids import UlidFactory
from agentpost_server.core.reaper import reap, sweep
from agentpost_server.settings import Settings
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


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def build_worker(settings: Settings, redis_url: str, *, handle_signals: bool) -> Worker:
    keys = Keys(settings.key_prefix)

    async def startup(ctx: dict[str, Any]) -> None:
        redis = ctx["redis"]
        writer = PipelineWriter(redis)
        writer.start()
        bus = RedisBus(redis, keys, "worker", writer)
        mailboxes = RedisMailboxes(
            redis,
            keys,
            writer,
            max_len=settings.mailbox_max_messages,
            idempotency_ms=int(settings.idempotency_window * 1000),
            retry_ms=int(settings.retry_window * 1000),
        )
        ctx.update(
            bus=bus,
            writer=writer,
            presence=RedisPresence(redis, keys),
            ids=UlidFactory(),
            mailboxes=mailboxes,
            redis_plain=redis,
            keys=keys,
            max_age_ms=int(settings.mailbox_max_age * 1000),
        )

    async def shutdown(ctx: dict[str, Any]) -> None:
        writer = ctx.get("writer")
        if writer is not None:
            await writer.close()

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
        on_shutdown=shutdown,
        job_serializer=_dumps,
        job_deserializer=json.loads,
        handle_signals=handle_signals,
        poll_delay=0.5,
        health_check_key=f"{settings.key_prefix}:jobs:health",
    )


async def run_worker(worker: Worker) -> None:
    """Run an in-process worker until cancelled, then close it (and its Redis pool)."""
    try:
        await worker.main()
    finally:
        # arq 0.28 closes its pool with redis-py's deprecated close(); the pool is still closed.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            await worker.close()
