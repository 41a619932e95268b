"""Builders shared by the server process (`app`) and the worker (`jobs.worker`)."""

from __future__ import annotations

from collections.abc import Callable

from redis.asyncio import Redis

from agentpost_server.core.ids import UlidFactory
from agentpost_server.core.ports import PresenceStore
from agentpost_server.core.tasks.lifecycle import TaskConfig
from agentpost_server.core.tasks.service import TaskService
from agentpost_server.core.workflows.driver import WorkflowService
from agentpost_server.settings import Settings
from agentpost_server.store.audit import RedisAudit
from agentpost_server.store.keys import Keys
from agentpost_server.store.tasks import RedisTasks
from agentpost_server.store.workflows import RedisWorkflows


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def task_config(s: Settings) -> TaskConfig:
    return TaskConfig(
        accept_ms=_ms(s.task_accept_timeout),
        max_attempts=s.task_max_attempts,
        offline_grace_ms=_ms(s.task_offline_grace),
        backoff_ms=_ms(s.task_retry_backoff),
        backoff_max_ms=_ms(s.task_retry_backoff_max),
    )


def audit(s: Settings, redis: Redis, keys: Keys) -> RedisAudit:
    return RedisAudit(redis, keys, retention=s.audit_retention)


def tasks(
    s: Settings,
    redis: Redis,
    keys: Keys,
    presence: PresenceStore,
    wake: Callable[[str], None],
) -> TaskService:
    store = RedisTasks(
        redis,
        keys,
        retention_ms=_ms(s.task_retention),
        audit_retention=s.audit_retention,
        idempotency_ms=_ms(s.idempotency_window),
        retry_ms=_ms(s.retry_window),
    )
    return TaskService(
        store,
        presence,
        UlidFactory(),
        wake,
        task_config(s),
        max_payload_bytes=s.max_payload_bytes,
    )


def workflows(s: Settings, redis: Redis, keys: Keys, tasks: TaskService) -> WorkflowService:
    """The workflow driver; it becomes the task service's observer."""
    return WorkflowService(
        RedisWorkflows(redis, keys, retention_ms=_ms(s.task_retention)),
        tasks,
        UlidFactory(),
        audit(s, redis, keys),
        max_steps=s.max_workflow_steps,
    )
