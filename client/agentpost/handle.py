"""`TaskHandle`: the originator's side of a task handed off (`Agent.handoff`, `Client.handoff`).

    handle = await agent.handoff("coder", title="Fix the build", input={"log": log})
    async for event in handle.events():      # every event, resumed after a dropped stream
        print(event.state, event.message)
    result = await handle.result(timeout=600)   # or TaskFailedError, RequestTimeoutError

Everything is event-driven (`WatchTask`), never polled. Questions of the assignee show up as
events in state `input-required` (`event.message` the question, `event.payload` its detail);
answer them with `provide_input()`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from agentpost._taskcalls import TaskCalls
from agentpost.errors import ConnectionLostError, InvalidArgumentError, RequestTimeoutError
from agentpost.payload import fill_payload
from agentpost.tasks import TaskEvent, TaskEventKind, TaskFailedError, TaskInfo, TaskState
from agentpost.v1 import tasks_pb2

__all__ = ["TaskHandle"]


class TaskHandle:
    """A task this agent (or client) handed off, by id. Every method raises `AgentpostError`s
    only; `TaskNotFoundError` once the task is past the server's retention."""

    def __init__(self, calls: TaskCalls, task_id: str, *, duplicate: bool = False) -> None:
        self._calls = calls
        self._id = task_id
        self._duplicate = duplicate
        self._end: TaskEvent | None = None

    @classmethod
    async def hand_off(
        cls, calls: TaskCalls, spec: tasks_pb2.TaskSpec, idempotency_key: str
    ) -> TaskHandle:
        """Hand the task `spec` describes off; its handle."""
        info, duplicate = await calls.handoff(spec, idempotency_key)
        return cls(calls, info.id, duplicate=duplicate)

    @property
    def id(self) -> str:
        """The task id, given by the server."""
        return self._id

    @property
    def duplicate(self) -> bool:
        """True when the handoff's idempotency key matched an earlier handoff: this is that
        task, not a new one."""
        return self._duplicate

    async def get(self, *, history: bool = False) -> TaskInfo:
        """The task as the server knows it now (with every event so far, with `history`)."""
        return await self._calls.get(self._id, history=history)

    async def events(self, after_seq: int = 0) -> AsyncGenerator[TaskEvent, None]:
        """The task's events after `after_seq` (0: from the first), in order, each once.

        Waits for new ones and ends after the terminal event (completed, failed, rejected,
        canceled, expired). A dropped stream is resumed after the last event seen; when the
        server stays unreachable for `connect_timeout`, raises `UnavailableError`.
        """
        async with contextlib.aclosing(self._calls.watch(self._id, after_seq)) as stream:
            async for event in stream:
                if event.terminal:
                    self._end = event
                yield event

    async def questions(self) -> AsyncGenerator[TaskEvent, None]:
        """The assignee's questions (events in state input-required: `message` is the question,
        `payload` its detail), as they come; ends with the task. Answer with `provide_input`."""
        async with contextlib.aclosing(self.events()) as events:
            async for event in events:
                if (
                    event.kind is TaskEventKind.TRANSITION
                    and event.state is TaskState.INPUT_REQUIRED
                ):
                    yield event

    async def result(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Wait for the task to end; its result when it completed.

        Raises `TaskFailedError` (`.state`: failed, rejected, canceled or expired; `.reason`)
        when it ended otherwise, and `RequestTimeoutError` (a `TimeoutError`) when it has not
        ended within `timeout` seconds (None: wait as long as it takes). A timeout does not
        cancel the task: call `cancel()` for that.
        """
        if timeout is not None and not timeout > 0:
            raise InvalidArgumentError("timeout must be positive", metadata={"field": "timeout"})
        end = self._end
        if end is None:
            try:
                async with asyncio.timeout(timeout):
                    end = await self._wait_end()
            except TimeoutError as exc:
                if isinstance(exc, RequestTimeoutError):
                    raise
                raise RequestTimeoutError(
                    f"task {self._id} did not end within {timeout:g}s",
                    metadata={"task_id": self._id},
                ) from None
        if end.state is TaskState.COMPLETED:
            return end.payload
        raise TaskFailedError.of(self._id, end)

    async def _wait_end(self) -> TaskEvent:
        # Only the terminal event matters; the server replays the history before it.
        async with contextlib.aclosing(self.events()) as events:
            async for event in events:
                if event.terminal:
                    return event
        raise ConnectionLostError(f"the watch of task {self._id} ended before the task")

    async def cancel(self, reason: str = "") -> TaskInfo:
        """Cancel the task (originator only); the assignee is told. The task after it.
        `TaskStateError` if it has ended already."""
        return await self._calls.cancel(self._id, reason)

    async def provide_input(self, value: Any, *, content_type: str | None = None) -> TaskInfo:
        """Answer the assignee's question (the task must be in input-required); the task after
        it, working again. `TaskStateError` if no question is open."""
        request = tasks_pb2.UpdateTaskRequest(task_id=self._id, attempt=0)
        request.input.SetInParent()
        fill_payload(request.input.payload, value, content_type=content_type)
        return await self._calls.update(request)

    def __repr__(self) -> str:
        return f"<TaskHandle {self._id}>"
