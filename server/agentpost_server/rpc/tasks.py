"""The task RPCs of the servicer: decode, call the task service, encode."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from agentpost.errors import InvalidArgumentError, PermissionDeniedError, TaskNotFoundError
from agentpost.v1 import tasks_pb2
from agentpost_server.core.auth import Principal
from agentpost_server.core.ports import Audit
from agentpost_server.core.tasks.service import TaskService
from agentpost_server.rpc import depth
from agentpost_server.rpc.auth import CallAuth, caller
from agentpost_server.rpc.errors import streaming, unary

Ctx = grpc.aio.ServicerContext[Any, Any]
ANONYMOUS = "anonymous"


@contextlib.contextmanager
def audited(auth: CallAuth, who: Principal, action: str, subject: str) -> Iterator[None]:
    """A refusal by the task or workflow service is audited like the guard's own."""
    try:
        yield
    except PermissionDeniedError as exc:
        auth.guard.deny(who, action, subject, {"why": exc.message[:200]})
        raise


def admin(who: Principal) -> bool:
    """May it see and cancel others' tasks and runs? With authentication: role `admin`. Without
    (identity is the caller's word): only "anonymous" (an operator's CLI or grpcurl), so that a
    named agent still cannot cancel another's task by mistake."""
    return who.is_admin if who.enforced else who.agent_id == ANONYMOUS


def _limit(value: int) -> int:
    if value < 0:
        raise InvalidArgumentError("limit must not be negative", metadata={"field": "limit"})
    return min(value or 100, 1000)


class TaskRpcs:
    """Handoff, GetTask, WatchTask, CancelTask, UpdateTask, ListTasks and ListAudit."""

    call_auth: CallAuth
    _tasks: TaskService
    _audit: Audit

    @unary(tasks_pb2.HandoffRequest)
    async def Handoff(
        self, request: tasks_pb2.HandoffRequest, context: Ctx
    ) -> tasks_pb2.HandoffResponse:
        who = caller(context)
        depth.check_task_spec(request.spec)
        task, duplicate = await self._tasks.handoff(
            who.agent_id, request.spec, request.idempotency_key
        )
        return tasks_pb2.HandoffResponse(task=task, duplicate=duplicate)

    @unary(tasks_pb2.GetTaskRequest)
    async def GetTask(
        self, request: tasks_pb2.GetTaskRequest, context: Ctx
    ) -> tasks_pb2.GetTaskResponse:
        who = caller(context)
        with audited(self.call_auth, who, "get_task", request.task_id):
            task = await self._tasks.get(who.agent_id, admin(who), request.task_id, request.history)
        return tasks_pb2.GetTaskResponse(task=task)

    @streaming(tasks_pb2.WatchTaskRequest)
    async def WatchTask(
        self, request: tasks_pb2.WatchTaskRequest, context: Ctx
    ) -> AsyncIterator[tasks_pb2.WatchTaskResponse]:
        who = caller(context)
        with audited(self.call_auth, who, "watch_task", request.task_id):
            watch = self._tasks.watch(who.agent_id, admin(who), request.task_id, request.after_seq)
            first = await anext(watch, None)
        if first is not None:
            yield tasks_pb2.WatchTaskResponse(events=first)
            async for events in watch:
                yield tasks_pb2.WatchTaskResponse(events=events)

    @unary(tasks_pb2.CancelTaskRequest)
    async def CancelTask(
        self, request: tasks_pb2.CancelTaskRequest, context: Ctx
    ) -> tasks_pb2.CancelTaskResponse:
        who = caller(context)
        with audited(self.call_auth, who, "cancel_task", request.task_id):
            task = await self._tasks.cancel(
                who.agent_id, admin(who), request.task_id, request.reason
            )
        return tasks_pb2.CancelTaskResponse(task=task)

    @unary(tasks_pb2.UpdateTaskRequest)
    async def UpdateTask(
        self, request: tasks_pb2.UpdateTaskRequest, context: Ctx
    ) -> tasks_pb2.UpdateTaskResponse:
        who = caller(context)
        action = request.WhichOneof("action")
        if action == "complete":
            depth.check_task_payload(request.complete.result, "complete.result")
        elif action == "input":
            depth.check_task_payload(request.input.payload, "input.payload")
        elif action == "request_input":
            depth.check_task_payload(request.request_input.payload, "request_input.payload")
        with audited(self.call_auth, who, "update_task", request.task_id):
            task = await self._tasks.update(who.agent_id, admin(who), request)
        return tasks_pb2.UpdateTaskResponse(task=task)

    @unary(tasks_pb2.ListTasksRequest)
    async def ListTasks(
        self, request: tasks_pb2.ListTasksRequest, context: Ctx
    ) -> tasks_pb2.ListTasksResponse:
        who = caller(context)
        tasks = await self._tasks.list_tasks(
            who.agent_id,
            admin(who),
            dead=request.dead,
            states=list(request.states),
            originator=request.originator,
            assignee=request.assignee,
            limit=_limit(request.limit),
        )
        return tasks_pb2.ListTasksResponse(tasks=tasks)

    @unary(tasks_pb2.ListAuditRequest)
    async def ListAudit(
        self, request: tasks_pb2.ListAuditRequest, context: Ctx
    ) -> tasks_pb2.ListAuditResponse:
        who = caller(context)
        subject = request.subject
        if not admin(who) and subject != who.agent_id:
            # Without the admin role: records about itself, or about a task it is part of.
            with audited(self.call_auth, who, "list_audit", subject or "*"):
                if not subject:
                    raise PermissionDeniedError(
                        "listing the whole audit stream needs the admin role; name a subject"
                    )
                try:  # a task it is part of
                    await self._tasks.get(who.agent_id, False, subject, False)
                except TaskNotFoundError:
                    raise PermissionDeniedError(
                        f"the audit records about {subject!r} need the admin role (without it:"
                        " records about yourself or a task you are part of)"
                    ) from None
        response = tasks_pb2.ListAuditResponse()
        for record in await self._audit.list(subject, _limit(request.limit)):
            entry = response.records.add(
                id=record.id,
                actor=record.actor,
                action=record.action,
                subject=record.subject,
                details=record.details,
            )
            entry.time.FromMilliseconds(record.time_ms)
        return response
