"""A session's task desk: the TASK_OFFER and TASK_UPDATE deliveries of its mailbox, which never
reach `messages()`.

* An offer becomes an `Assignment`, queued for `Agent.tasks()` (or the task handler). It is
  acknowledged when it is handed to the application: an agent that stops before that gets it
  again. An offer taken away before it was handed out (canceled, expired, offered elsewhere)
  is acknowledged and skipped.
* An update is acknowledged at once and applied to the assignment of its task: an answer to
  its question, or the news that the task was taken away (`Assignment.canceled`). Updates for
  tasks this session does not hold are dropped.

Offers are queued without a bound, so the reader never waits for the application here and
updates (the answers `ask()` waits for) always get through; the server's flow-control window
bounds the offers not yet handed out, since they are not acknowledged.

With a handler (`Agent.handle_tasks`), a dispatcher hands each offer to it, at most
`max_concurrent_handlers` at once: accept, run the handler, complete with its return value or
fail with its exception; a handler whose task is taken away is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agentpost._inbox import Inbox
from agentpost._taskcalls import TaskCalls
from agentpost.assignment import Assignment
from agentpost.config import ConnectOptions
from agentpost.errors import AgentpostError, InvalidArgumentError, TaskStateError
from agentpost.tasks import TaskEvent, TaskEventKind, TaskInfo
from agentpost.v1 import envelope_pb2, messaging_pb2

__all__ = ["TaskDesk", "TaskHandler", "failure_text"]

logger = logging.getLogger(__name__)

#: Works on an accepted task: its return value completes it, raising fails it.
TaskHandler = Callable[[Assignment], Awaitable[Any]]

_OFFER = envelope_pb2.MESSAGE_KIND_TASK_OFFER
_MAX_ERROR_TEXT = 2048


class _End:
    """The queue's last item: `next()` returns None (or raises `error`)."""

    def __init__(self, error: AgentpostError | None) -> None:
        self.error = error


class TaskDesk:
    """See the module docstring."""

    def __init__(
        self, calls: TaskCalls, *, agent_id: str, inbox: Inbox, options: ConnectOptions
    ) -> None:
        self.calls = calls
        self._agent_id = agent_id
        self._inbox = inbox
        self._queue: asyncio.Queue[Assignment | _End] = asyncio.Queue()
        self._active: dict[str, Assignment] = {}
        self._handler: TaskHandler | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(options.max_concurrent_handlers)
        self.closed = False

    # ----------------------------------------------------------------- in

    def deliver(self, event: messaging_pb2.ServerEvent) -> None:
        """Take a TASK_OFFER or TASK_UPDATE delivery (never waits)."""
        if self.closed or not self._inbox.admit(event):
            return
        envelope = event.delivery
        notice = envelope.task
        info = TaskInfo.from_proto(notice.task)
        held = self._active.get(info.id)
        if envelope.kind != _OFFER:
            self._settle(envelope.id)
            if held is not None and notice.HasField("event"):
                held.notice(TaskEvent.from_proto(notice.event))
            else:
                logger.debug("dropping news of task %s, which this agent does not hold", info.id)
            return
        if held is not None and held.attempt >= info.attempt:
            self._settle(envelope.id)  # this attempt is offered already
            return
        offer = Assignment(
            info,
            calls=self.calls,
            agent_id=self._agent_id,
            message_id=envelope.id,
            forget=self._forget,
        )
        if held is not None:
            held.lose(_offered_again(info))
        self._active[info.id] = offer
        self._queue.put_nowait(offer)

    def _forget(self, assignment: Assignment) -> None:
        if self._active.get(assignment.id) is assignment:
            del self._active[assignment.id]

    def _settle(self, message_id: str) -> None:
        if not self._inbox.closed:
            self._inbox.ack(message_id)

    # ----------------------------------------------------------------- out

    async def next(self) -> Assignment | None:
        """The next open offer, acknowledged; None once closed; raises the error the desk
        `end`ed with."""
        queue = self._queue
        while not self.closed:
            item = queue.get_nowait() if not queue.empty() else await queue.get()
            if isinstance(item, _End):
                queue.put_nowait(item)  # for the other readers
                if item.error is not None:
                    raise type(item.error)(item.error.message, metadata=item.error.metadata)
                return None
            self._settle(item.message_id)
            if not item.finished:
                return item
        return None

    def set_handler(self, handler: TaskHandler | None) -> None:
        """Hand offers to `handler` from now on (None: to `next()` again)."""
        self._handler = handler
        dispatcher = self._dispatcher
        if handler is None:
            self._dispatcher = None
            if dispatcher is not None:
                dispatcher.cancel()
        elif dispatcher is None and not self.closed:
            self._dispatcher = asyncio.create_task(self._dispatch(), name="agentpost-tasks")

    async def _dispatch(self) -> None:
        slots = self._slots
        while True:
            await slots.acquire()  # before taking an offer: a cancelled dispatcher drops none
            try:
                offer = await self.next()
            except AgentpostError as exc:
                slots.release()
                logger.error("no more tasks: %s", exc.message)
                return
            except BaseException:
                slots.release()
                raise
            if offer is None:
                slots.release()
                return
            handler = self._handler
            if handler is None:  # pragma: no cover (set_handler cancels the dispatcher first)
                slots.release()
                return
            run = asyncio.create_task(self._run(offer, handler), name=f"agentpost-task-{offer.id}")
            self._running.add(run)
            run.add_done_callback(self._ran)

    def _ran(self, run: asyncio.Task[None]) -> None:
        self._running.discard(run)
        self._slots.release()
        if not run.cancelled() and (exc := run.exception()) is not None:
            logger.error("task handler runner failed", exc_info=exc)

    async def _run(self, offer: Assignment, handler: TaskHandler) -> None:
        try:
            await offer.accept()
        except TaskStateError as exc:
            logger.info("offer of task %s is no longer open: %s", offer.id, exc.message)
            return
        except AgentpostError as exc:
            logger.warning("cannot accept task %s: %s", offer.id, exc.message)
            return
        work = asyncio.create_task(_call(handler, offer))
        lost = asyncio.create_task(offer.canceled.wait())
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not work.done():
                work.cancel()
                await asyncio.wait({work})
        if offer.finished:  # taken away (the handler was cancelled), or it reported itself
            return
        try:
            if work.cancelled():
                await offer.fail("the task handler was cancelled")
            elif (failure := work.exception()) is not None:
                logger.warning("task handler failed on %s", offer.id, exc_info=failure)
                await offer.fail(failure_text(failure))
            else:
                try:
                    await offer.complete(work.result())
                except InvalidArgumentError as exc:  # the result cannot be sent
                    await offer.fail(f"the handler's result cannot be sent: {exc.message}")
        except AgentpostError as exc:
            logger.warning("cannot finish task %s: %s", offer.id, exc.message)

    # ----------------------------------------------------------------- lifecycle

    def end(self, error: AgentpostError | None) -> None:
        """No more offers: `next()` returns None (or raises `error`) once the queue is read."""
        self._queue.put_nowait(_End(error))

    async def close(self) -> None:
        """Stop: no more offers, and the running handlers are cancelled (the server gives their
        tasks another attempt once it notices that this agent is gone)."""
        if self.closed:
            return
        self.closed = True
        self.end(None)
        current = asyncio.current_task()
        tasks = [
            t for t in (self._dispatcher, *self._running) if t is not None and t is not current
        ]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


async def _call(handler: TaskHandler, offer: Assignment) -> Any:
    return await handler(offer)


def failure_text(exc: BaseException) -> str:
    """What a failed handler reports: "TypeName: text", cut to a sensible length."""
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > _MAX_ERROR_TEXT:
        text = text[: _MAX_ERROR_TEXT - 3] + "..."
    return text


def _offered_again(info: TaskInfo) -> TaskEvent:
    """What took an older offer of the same task away: this new offer."""
    return TaskEvent(
        seq=0,
        task_id=info.id,
        kind=TaskEventKind.TRANSITION,
        state=info.state,
        actor="agentpost",
        time=info.updated_at,
        message="offered again",
        percent=None,
        assignee=info.assignee,
        attempt=info.attempt,
        payload=None,
        error=None,
    )
