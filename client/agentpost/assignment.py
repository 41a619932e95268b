"""`Assignment`: a task offered to this agent, and what the agent does with it.

    async for task in agent.tasks():
        await task.accept()
        await task.progress("reading the log", percent=10)
        answer = await task.ask("Which branch?")            # the originator answers
        await task.complete({"fixed": True})                 # or task.fail("why")

Every action names the attempt of the offer, so an agent whose offer timed out (and went to
another agent) gets `TaskStateError` instead of acting on someone else's attempt. News from the
server (the task was canceled, expired, or given to another agent) sets `canceled`, so that
long-running work can stop; a pending `ask()` then raises `TaskStateError`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
from collections.abc import Callable
from typing import Any

from agentpost._taskcalls import TaskCalls
from agentpost.errors import (
    AgentpostError,
    InvalidArgumentError,
    RequestTimeoutError,
    TaskStateError,
)
from agentpost.payload import fill_payload
from agentpost.tasks import TaskEvent, TaskEventKind, TaskInfo, TaskState
from agentpost.v1 import tasks_pb2

__all__ = ["Assignment"]

logger = logging.getLogger(__name__)


class Assignment:
    """A task offered to this agent (from `Agent.tasks()`, or given to a task handler).

    Accept or reject it; once accepted, report progress, ask the originator questions, and
    complete or fail it. The fields describe the task as offered; `info` is the whole
    `TaskInfo`. Every method raises `AgentpostError`s only: `TaskStateError` when the task's
    state does not allow the action (an offer that timed out, a task canceled meanwhile).
    """

    def __init__(
        self,
        info: TaskInfo,
        *,
        calls: TaskCalls,
        agent_id: str,
        message_id: str = "",
        forget: Callable[[Assignment], None] | None = None,
    ) -> None:
        self._info = info
        self._calls = calls
        self._agent_id = agent_id
        self._state = info.state
        self._forget = forget
        #: The id of the mailbox delivery that offered it (acknowledged when handed out).
        self.message_id = message_id
        #: Set when the task is taken away: canceled, expired, or given to another agent.
        self.canceled = asyncio.Event()
        self._cancellation: TaskEvent | None = None
        self._finished = False
        self._answer: asyncio.Future[Any] | None = None
        self._asked = 0  # questions asked in this attempt

    # ----------------------------------------------------------------- the task

    @property
    def info(self) -> TaskInfo:
        """The task as it was offered."""
        return self._info

    @property
    def id(self) -> str:
        return self._info.id

    @property
    def title(self) -> str:
        return self._info.title

    @property
    def description(self) -> str:
        return self._info.description

    @property
    def input(self) -> Any:
        """The task's input (JSON data, bytes, or None)."""
        return self._info.input

    @property
    def context(self) -> dict[str, Any]:
        return self._info.context

    @property
    def references(self) -> dict[str, str]:
        return self._info.references

    @property
    def originator(self) -> str:
        """The agent that handed the task off."""
        return self._info.originator

    @property
    def attempt(self) -> int:
        """The attempt this offer is (every action names it)."""
        return self._info.attempt

    @property
    def priority(self) -> int:
        return self._info.priority

    @property
    def deadline(self) -> datetime.datetime | None:
        return self._info.deadline

    @property
    def state(self) -> TaskState:
        """The task's state as this agent last learnt it."""
        return self._state

    @property
    def cancellation(self) -> TaskEvent | None:
        """The event that took the task away (state canceled or expired, or an offer to another
        agent), once `canceled` is set."""
        return self._cancellation

    @property
    def finished(self) -> bool:
        """Whether this agent is done with the task: rejected, completed, failed or lost it."""
        return self._finished

    # ----------------------------------------------------------------- actions

    async def accept(self) -> None:
        """Take the task: it is now this agent's to work on. `TaskStateError` if the offer is
        no longer open (it timed out and went elsewhere, or the task was canceled)."""
        request = self._request()
        request.accept.SetInParent()
        await self._act(request)

    async def _follow(self, asked: int) -> None:
        """While `ask()` waits, follow the task with WatchTask: the answer (or the loss of the
        task) also comes through the mailbox, but with replicas of this agent the mailbox may
        hand it to another one; the watch reaches this one. Events up to this attempt's
        `asked`-th question are skipped; repeats of mailbox news are harmless."""
        seen = 0
        try:
            async for event in self._calls.watch(self.id):
                if seen < asked:
                    if (
                        event.kind is TaskEventKind.TRANSITION
                        and event.state is TaskState.INPUT_REQUIRED
                        and event.attempt == self.attempt
                    ):
                        seen += 1
                    continue
                if self._finished:
                    return
                self.notice(event)
        except AgentpostError as exc:  # the mailbox still brings the news
            logger.debug("task %s: not following it any more: %s", self.id, exc.message)

    async def reject(self, reason: str = "") -> None:
        """Refuse the offer; the server offers the task elsewhere (or it ends rejected)."""
        request = self._request()
        request.reject.reason = reason
        await self._act(request, final=True)

    async def progress(self, message: str = "", percent: float | None = None) -> None:
        """Tell the originator how it goes (`percent` from 0 to 100, if known)."""
        request = self._request()
        progress = request.progress
        progress.message = message
        if percent is not None:
            if isinstance(percent, bool) or not isinstance(percent, int | float):
                raise InvalidArgumentError(
                    "percent must be a number", metadata={"field": "percent"}
                )
            if not (math.isfinite(percent) and 0 <= percent <= 100):
                raise InvalidArgumentError(
                    "percent must be between 0 and 100", metadata={"field": "percent"}
                )
            progress.percent = round(percent)
            progress.has_percent = True
        else:
            progress.percent = -1
        await self._act(request)

    async def ask(
        self,
        question: str,
        payload: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        content_type: str | None = None,
    ) -> Any:
        """Ask the originator `question` (with optional structured `payload`) and wait for the
        answer, which is returned (decoded like any payload).

        The task waits in input-required meanwhile. Raises `TaskStateError` if the task is
        canceled, expires or is given to another agent while waiting, and
        `RequestTimeoutError` when no answer came within `timeout` seconds (None: no limit;
        the task stays input-required).
        """
        if timeout is not None and not timeout > 0:
            raise InvalidArgumentError("timeout must be positive", metadata={"field": "timeout"})
        if self._answer is not None:
            raise TaskStateError(f"task {self.id} already waits for an answer")
        request = self._request()
        asked = request.request_input
        asked.SetInParent()
        asked.message = question
        if payload is not None:
            fill_payload(asked.payload, payload, content_type=content_type)
        # Waiting before asking: the answer may come before UpdateTask's response does.
        answer = self._answer = asyncio.get_running_loop().create_future()
        follower: asyncio.Task[None] | None = None
        try:
            await self._act(request)
            self._asked += 1
            follower = asyncio.create_task(self._follow(self._asked), name=f"follow-{self.id}")
            try:
                async with asyncio.timeout(timeout):
                    return await answer
            except TimeoutError as exc:
                if isinstance(exc, RequestTimeoutError):
                    raise
                raise RequestTimeoutError(
                    f"no answer to the question on task {self.id} within {timeout:g}s",
                    metadata={"task_id": self.id},
                ) from None
        finally:
            if follower is not None:
                follower.cancel()
            self._answer = None
            if not answer.done():
                answer.cancel()
            elif not answer.cancelled():
                answer.exception()  # retrieved: the action's own error is what is raised

    async def complete(self, result: Any = None, *, content_type: str | None = None) -> None:
        """Finish the task with `result` (JSON data or bytes); the originator gets it."""
        request = self._request()
        complete = request.complete
        complete.SetInParent()
        if result is not None:
            fill_payload(complete.result, result, content_type=content_type)
        await self._act(request, final=True)

    async def fail(self, message: str, *, retryable: bool = False) -> None:
        """Give up on the task, saying why. With `retryable`, the server may offer it to
        another agent (a capability's), if attempts are left; otherwise it ends failed."""
        request = self._request()
        request.fail.message = message
        request.fail.retryable = retryable
        await self._act(request, final=True)

    def _request(self) -> tasks_pb2.UpdateTaskRequest:
        if self._cancellation is not None:
            raise TaskStateError(_lost_text(self.id, self._cancellation))
        return tasks_pb2.UpdateTaskRequest(task_id=self.id, attempt=self.attempt)

    async def _act(self, request: tasks_pb2.UpdateTaskRequest, *, final: bool = False) -> None:
        info = await self._calls.update(request)
        self._state = info.state
        if final or info.state.terminal:
            self._finish()

    # ----------------------------------------------------------------- news

    def notice(self, event: TaskEvent) -> None:
        """News about the task from the mailbox (a TASK_UPDATE): an answer, or the loss."""
        if event.kind is TaskEventKind.INPUT:
            answer = self._answer
            if answer is not None and not answer.done():
                self._state = TaskState.WORKING
                answer.set_result(event.payload)
            else:
                logger.info("task %s: an answer came while no question was waiting", self.id)
            return
        if event.kind is not TaskEventKind.TRANSITION or self._finished:
            return
        # The server tells a previous assignee that its attempt is over with a transition back
        # to submitted (naming that assignee and attempt), or to offered to someone else.
        taken = event.state is TaskState.SUBMITTED or (
            event.state is TaskState.OFFERED
            and (event.assignee != self._agent_id or event.attempt != self.attempt)
        )
        if event.state.terminal or taken:
            self._lose(event)
        elif event.attempt == self.attempt:
            self._state = event.state

    def lose(self, event: TaskEvent) -> None:
        """The task was taken away (`event` says how): set `canceled`, end a pending `ask`."""
        if not self._finished:
            self._lose(event)

    def _lose(self, event: TaskEvent) -> None:
        self._cancellation = event
        self._state = event.state
        self.canceled.set()
        answer = self._answer
        if answer is not None and not answer.done():
            answer.set_exception(TaskStateError(_lost_text(self.id, event)))
        self._finish()

    def _finish(self) -> None:
        if not self._finished:
            self._finished = True
            if self._forget is not None:
                self._forget(self)

    def __repr__(self) -> str:
        return (
            f"Assignment(id={self.id!r}, title={self.title!r}, originator={self.originator!r},"
            f" attempt={self.attempt}, state={self._state.value!r})"
        )


def _lost_text(task_id: str, event: TaskEvent) -> str:
    if event.state.terminal:
        why = event.error or event.message
        return f"task {task_id} was {event.state.value}" + (f": {why}" if why else "")
    why = event.error or event.message
    return f"task {task_id} is no longer this agent's (attempt {event.attempt})" + (
        f": {why}" if why else ""
    )
