"""The arq worker: background jobs that must run exactly once across every server process.

arq stays behind this module: the rest of the server knows `build_worker` and `run_worker`.
Jobs are JSON-serialized (never pickle). Queue name: "<key prefix>:jobs".

Jobs so far:
- `reap_dead_servers` (cron, every `reap_interval` seconds): remove the sessions of server
  processes whose heartbeat expired, so their agents show offline.
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
from agentpost_server.core.reaper import reap
from agentpost_server.settings import Settings
from agentpost_server.store.bus import RedisBus
from agentpost_server.store.keys import Keys
from agentpost_server.store.presence import RedisPresence

log = logging.getLogger(__name__)


async def reap_dead_servers(ctx: dict[str, Any]) -> int:
    return await reap(ctx["presence"], ctx["bus"], ctx["ids"])


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def build_worker(settings: Settings, redis_url: str, *, handle_signals: bool) -> Worker:
    keys = Keys(settings.key_prefix)

    async def startup(ctx: dict[str, Any]) -> None:
        redis = ctx["redis"]
        bus = RedisBus(redis, keys, server_id="worker")
        await bus.start()
        ctx.update(bus=bus, presence=RedisPresence(redis, keys), ids=UlidFactory())

    async def shutdown(ctx: dict[str, Any]) -> None:
        bus = ctx.get("bus")
        if bus is not None:
            await bus.close()

    every = max(1, round(settings.reap_interval))
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
            )
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
