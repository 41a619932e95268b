"""`TaskMethods`: the originator's task methods that `Agent` and `Client` share (handoff,
task_handle, get_task, watch_task, cancel_task, list_tasks, audit), over the `TaskCalls` of their
identity."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from agentpost import _keys
from agentpost._keys import RetryKeys
from agentpost._taskcalls import TaskCalls
from agentpost.audit import AuditRecord
from agentpost.handle import TaskHandle
from agentpost.tasks import TaskEvent, TaskInfo, TaskState, build_spec

__all__ = ["TaskMethods"]


class TaskMethods:
    """Mixed into `Agent` and `Client`, which provide `_task_calls()` and `_retry_key`."""

    _retry_key: RetryKeys

    def _task_calls(self) -> TaskCalls:  # pragma: no cover (always overridden)
        raise NotImplementedError

    async def handoff(
        self,
        to: str | None = None,
        *,
        capability: str | None = None,
        title: str,
        description: str = "",
        input: Any = None,
        context: Mapping[str, Any] | None = None,
        references: Mapping[str, str] | None = None,
        priority: int = 0,
        deadline: datetime.datetime | datetime.timedelta | float | None = None,
        accept_timeout: float | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
    ) -> TaskHandle:
        """Hand a task off to agent `to`, or to any agent with `capability` (exactly one);
        returns at once with its handle (`await handle.result()` waits for the outcome).

        `title` (1-200 characters) and `description` say what to do, `input` (JSON data or
        bytes), `context` (a JSON object) and `references` (strings) carry what is needed.
        Higher `priority` (-1000 to 1000) is offered first. `deadline` (an aware datetime, a
        timedelta or seconds from now) expires the task; `accept_timeout` (seconds) and
        `max_attempts` override the server's defaults for offers.

        Like `send`, a handoff carries an idempotency key, so one repeated after a lost
        connection creates one task: the SDK's short-lived "~" key, or your own
        `idempotency_key` to retry later yourself (`handle.duplicate` is then True).
        Raises `AgentNotFoundError` for an unknown `to`, `InvalidArgumentError` for a bad
        argument (before anything is sent).
        """
        spec = build_spec(
            to=to,
            capability=capability,
            title=title,
            description=description,
            input=input,
            context=context,
            references=references,
            priority=priority,
            deadline=deadline,
            accept_timeout=accept_timeout,
            max_attempts=max_attempts,
        )
        key = _keys.idempotency_key(idempotency_key, self._retry_key)
        return await TaskHandle.hand_off(self._task_calls(), spec, key)

    def task_handle(self, task_id: str) -> TaskHandle:
        """The handle of a task, by id (`result()`, `events()`, `cancel()`...)."""
        return TaskHandle(self._task_calls(), task_id)

    async def get_task(self, task_id: str, *, history: bool = False) -> TaskInfo:
        """A task as the server knows it; `TaskNotFoundError`."""
        return await self._task_calls().get(task_id, history=history)

    async def watch_task(self, task_id: str, after_seq: int = 0) -> AsyncGenerator[TaskEvent, None]:
        """A task's events after `after_seq`, as they come, ending after the terminal one
        (see `TaskHandle.events`)."""
        async with contextlib.aclosing(self._task_calls().watch(task_id, after_seq)) as events:
            async for event in events:
                yield event

    async def cancel_task(self, task_id: str, reason: str = "") -> TaskInfo:
        """Cancel a task (its originator, or an admin); the task after it."""
        return await self._task_calls().cancel(task_id, reason)

    async def list_tasks(
        self,
        *,
        dead: bool = False,
        states: Sequence[TaskState | str] = (),
        originator: str | None = None,
        assignee: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        """Tasks, newest first, without history: only `dead` ones (failed, rejected, expired),
        only in `states`, only of an `originator` or an `assignee`; at most `limit` (1-1000)."""
        return await self._task_calls().list_tasks(
            dead=dead, states=states, originator=originator, assignee=assignee, limit=limit
        )

    async def audit(self, subject: str | None = None, limit: int = 100) -> list[AuditRecord]:
        """The audit trail, newest first: about `subject` (a task, workflow run or agent id)
        or everything; at most `limit` (1-1000)."""
        return await self._task_calls().audit(subject, limit)
