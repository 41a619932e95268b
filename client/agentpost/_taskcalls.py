"""`TaskCalls`: the task RPCs (Handoff, GetTask, WatchTask, CancelTask, UpdateTask, ListTasks,
ListAudit) of one identity, shared by `Agent` (on its session's channel) and `Client`.

Reads and handoffs (which carry an idempotency key) are repeated while the server is
unavailable, within `request_timeout`; the other writes are not (a repeated `complete` would
meet the first one's outcome as a `TaskStateError`): their `ConnectionLostError` means the
outcome is unknown. `watch` resumes a dropped stream after the last event seen.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Sequence

import grpc

from agentpost import _status
from agentpost._caller import Caller, closed_error, drain
from agentpost._keys import RETRY_KEY_PREFIX
from agentpost.audit import AuditRecord
from agentpost.errors import InvalidArgumentError, UnavailableError
from agentpost.tasks import TaskEvent, TaskInfo, TaskState, state_to_proto
from agentpost.v1 import tasks_pb2

__all__ = ["MAX_LIST", "TaskCalls"]

#: The most tasks or audit records one list call returns.
MAX_LIST = 1000

logger = logging.getLogger(__name__)


class TaskCalls:
    """See the module docstring."""

    def __init__(self, caller: Caller) -> None:
        self.caller = caller

    async def handoff(
        self, spec: tasks_pb2.TaskSpec, idempotency_key: str
    ) -> tuple[TaskInfo, bool]:
        """Hand the task off; the task as accepted, and whether the key matched an earlier one.
        Repeated with the same key while the server is unavailable."""
        caller = self.caller
        request = tasks_pb2.HandoffRequest(spec=spec, idempotency_key=idempotency_key)
        stub = caller.stub
        try:
            response = await caller.call_retrying(
                lambda timeout: stub.Handoff(request, timeout=timeout, metadata=caller.metadata)
            )
        except UnavailableError as exc:
            if not idempotency_key.startswith(
                RETRY_KEY_PREFIX
            ):  # the caller's own key: offer it for later
                exc.metadata.setdefault("idempotency_key", idempotency_key)
            raise
        return TaskInfo.from_proto(response.task), response.duplicate

    async def get(self, task_id: str, *, history: bool = False) -> TaskInfo:
        caller = self.caller
        request = tasks_pb2.GetTaskRequest(task_id=_task_id(task_id), history=history)
        stub = caller.stub
        response = await caller.call_retrying(
            lambda timeout: stub.GetTask(request, timeout=timeout, metadata=caller.metadata)
        )
        return TaskInfo.from_proto(response.task)

    async def cancel(self, task_id: str, reason: str = "") -> TaskInfo:
        caller = self.caller
        request = tasks_pb2.CancelTaskRequest(task_id=_task_id(task_id), reason=reason)
        stub = caller.stub
        response = await caller.once(
            lambda timeout: stub.CancelTask(request, timeout=timeout, metadata=caller.metadata)
        )
        return TaskInfo.from_proto(response.task)

    async def update(self, request: tasks_pb2.UpdateTaskRequest) -> TaskInfo:
        """One action on a task (its `attempt` set by the caller); the task after it."""
        caller = self.caller
        stub = caller.stub
        response = await caller.once(
            lambda timeout: stub.UpdateTask(request, timeout=timeout, metadata=caller.metadata)
        )
        return TaskInfo.from_proto(response.task)

    async def list_tasks(
        self,
        *,
        dead: bool = False,
        states: Sequence[TaskState | str] = (),
        originator: str | None = None,
        assignee: str | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        if isinstance(states, str):
            states = [states]
        request = tasks_pb2.ListTasksRequest(
            dead=dead,
            states=[state_to_proto(state) for state in states],
            originator=originator or "",
            assignee=assignee or "",
            limit=_limit(limit),
        )
        caller = self.caller
        stub = caller.stub
        response = await caller.call_retrying(
            lambda timeout: stub.ListTasks(request, timeout=timeout, metadata=caller.metadata)
        )
        return [TaskInfo.from_proto(task) for task in response.tasks]

    async def audit(self, subject: str | None = None, limit: int = 100) -> list[AuditRecord]:
        request = tasks_pb2.ListAuditRequest(subject=subject or "", limit=_limit(limit))
        caller = self.caller
        stub = caller.stub
        response = await caller.call_retrying(
            lambda timeout: stub.ListAudit(request, timeout=timeout, metadata=caller.metadata)
        )
        return [AuditRecord.from_proto(record) for record in response.records]

    async def watch(self, task_id: str, after_seq: int = 0) -> AsyncGenerator[TaskEvent, None]:
        """The task's events after `after_seq`, in order, each once, ending after the terminal
        one. A stream that drops (or ends early) is opened again after the last event seen,
        with backoff; after `connect_timeout` of failing attempts in a row the last
        `UnavailableError` is raised. Other errors (`TaskNotFoundError`...) are raised at once.
        """
        task_id = _task_id(task_id)
        if type(after_seq) is not int or after_seq < 0:
            raise InvalidArgumentError(
                "after_seq must be a non-negative integer", metadata={"field": "after_seq"}
            )
        caller = self.caller
        options = caller.options
        loop = asyncio.get_running_loop()
        backoff = options.reconnect_initial_backoff
        failing_since: float | None = None
        ended = False  # the task is over: the next stream that ends early is the last
        while True:
            request = tasks_pb2.WatchTaskRequest(task_id=task_id, after_seq=after_seq)
            try:
                call = caller.stub.WatchTask(request, metadata=caller.metadata)
            except grpc.aio.UsageError:
                raise closed_error() from None
            try:
                while True:
                    response = await call.read()
                    if not isinstance(response, tasks_pb2.WatchTaskResponse):
                        break  # the stream ended without the terminal event
                    for proto in response.events:
                        if proto.seq <= after_seq:
                            continue  # seen before the stream was resumed
                        event = TaskEvent.from_proto(proto)
                        after_seq = event.seq
                        failing_since = None
                        backoff = options.reconnect_initial_backoff
                        yield event
                        if event.terminal:
                            await drain(call)
                            return
            except grpc.aio.UsageError:
                raise closed_error() from None
            except grpc.RpcError as exc:
                error = _status.from_rpc_error(exc)
                if not isinstance(error, UnavailableError):
                    raise error from None
                now = loop.time()
                if failing_since is None:
                    failing_since = now
                elif now - failing_since >= options.connect_timeout:
                    raise error from None
                logger.info("watching task %s again: %s", task_id, error.message)
            else:
                # Ended early: a server going away (resume), or the terminal event was at or
                # before `after_seq`. Once the task is over, one more stream brings what is
                # left of its history (or nothing), at once.
                if ended:
                    return
                try:
                    over = (await self.get(task_id)).state.terminal
                except UnavailableError:
                    over = False  # the server is away: resume with backoff
                if over:
                    ended = True
                    continue
            finally:
                call.cancel()
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, options.reconnect_max_backoff)


def _task_id(task_id: str) -> str:
    if not isinstance(task_id, str) or not task_id:
        raise InvalidArgumentError(
            "task_id must be a non-empty string", metadata={"field": "task_id"}
        )
    return task_id


def _limit(limit: int) -> int:
    if type(limit) is not int or not 1 <= limit <= MAX_LIST:
        raise InvalidArgumentError(
            f"limit must be between 1 and {MAX_LIST}", metadata={"field": "limit"}
        )
    return limit
