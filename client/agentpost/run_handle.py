"""`RunHandle`: a workflow run started (`coordinate`) or attached to (`attach`) by an agent or
a client.

    run = await agent.coordinate("examples/review.yaml", input={"request": "add --json"})
    async for event in run:                  # every event once, in order, until the run ends
        print(event.seq, event.kind, event.step_id, event.message)
    outputs = await run.result(timeout=600)  # or WorkflowFailedError, RequestTimeoutError

The handle follows the run's Coordinate stream in the background from the moment it is first
used; a stream that drops (the connection was lost, the server went away) is re-attached with
the last `seq` seen, so no event is missed or repeated. The handle keeps the events it received:
every `async for` over it starts from the first one, and `result()` can be awaited alongside.
`close()` (or `async with run:`) stops following; the run itself goes on (`cancel()` stops it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, TypeAlias

from agentpost._workflowcalls import WorkflowCalls, check_run_id
from agentpost.errors import (
    AgentpostError,
    ConnectionLostError,
    InvalidArgumentError,
    InvalidWorkflowError,
    RequestTimeoutError,
)
from agentpost.payload import fill_payload
from agentpost.v1 import payload_pb2, workflows_pb2
from agentpost.workflow import definition_from_dict, load_definition
from agentpost.workflow_run import (
    WorkflowEvent,
    WorkflowEventKind,
    WorkflowFailedError,
    WorkflowInfo,
    WorkflowRunState,
)

__all__ = ["Definition", "RunHandle", "new_run_id", "prepare_definition"]

#: What `coordinate()` runs: the proto, plain data (the file format of `agentpost.workflow`),
#: or the path of a .yaml/.yml/.json file.
Definition: TypeAlias = (
    workflows_pb2.WorkflowDefinition | Mapping[str, Any] | str | os.PathLike[str]
)

logger = logging.getLogger(__name__)

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32, as the server's ULIDs


def new_run_id() -> str:
    """A new run id (a ULID: time-sortable, 26 characters), chosen by the SDK so that a start
    repeated after a lost connection attaches to the run instead of starting a second one."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(125, -5, -5))


def prepare_definition(
    definition: Definition, *, run_id: str | None = None, input: Any = None
) -> workflows_pb2.WorkflowDefinition:
    """The definition to send: loaded (a path) or built (plain data) or copied (a proto), with
    `run_id` and `input` overriding the definition's when given. A definition without a run id
    gets a new one here, so that the start can be repeated safely after a lost connection."""
    proto = workflows_pb2.WorkflowDefinition()
    if isinstance(definition, workflows_pb2.WorkflowDefinition):
        proto.CopyFrom(definition)
    elif isinstance(definition, Mapping):
        proto = definition_from_dict(definition)
    elif isinstance(definition, str | os.PathLike):
        proto = load_definition(definition)
    else:
        raise InvalidArgumentError(
            "definition must be a WorkflowDefinition, a mapping, or the path of a YAML or JSON "
            f"file, not {type(definition).__name__}",
            metadata={"field": "definition"},
        )
    if run_id is not None:
        proto.run_id = check_run_id(run_id)
    if input is not None:
        holder = payload_pb2.Payload()
        fill_payload(holder, input)
        if holder.WhichOneof("body") != "json":
            raise InvalidWorkflowError("input: bytes are not allowed, use JSON values")
        proto.input.CopyFrom(holder.json)
    if not proto.run_id:
        proto.run_id = new_run_id()
    return proto


class RunHandle:
    """A workflow run, by id. Every method raises `AgentpostError`s only."""

    def __init__(
        self,
        calls: WorkflowCalls,
        run_id: str,
        *,
        after_seq: int = 0,
        definition: workflows_pb2.WorkflowDefinition | None = None,
    ) -> None:
        self._calls = calls
        self._id = check_run_id(run_id)
        if type(after_seq) is not int or after_seq < 0:
            raise InvalidArgumentError(
                "after_seq must be a non-negative integer", metadata={"field": "after_seq"}
            )
        self._after_seq = after_seq
        self._definition = definition
        self._events: list[WorkflowEvent] = []
        self._end: WorkflowEvent | None = None
        self._final: WorkflowInfo | None = None  # the run's record, when its log ended before
        self._error: AgentpostError | None = None
        self._done = False
        self._news = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls, calls: WorkflowCalls, definition: workflows_pb2.WorkflowDefinition
    ) -> RunHandle:
        """Start the run `definition` describes (or attach to the run of its id); returns once
        the server accepted it (its first event arrived). Raises `InvalidWorkflowError` for a
        definition the server refuses, `UnavailableError` when it stays unreachable."""
        handle = cls(calls, definition.run_id, definition=definition)
        try:
            await handle._wait(lambda: bool(handle._events))
            if not handle._events and handle._error is not None:
                raise handle._error
        except BaseException:
            await handle.close()
            raise
        return handle

    # ----------------------------------------------------------------- what is known

    @property
    def id(self) -> str:
        """The run id."""
        return self._id

    @property
    def last_seq(self) -> int:
        """The `seq` of the last event received (re-attach after it to resume)."""
        return self._events[-1].seq if self._events else self._after_seq

    @property
    def done(self) -> bool:
        """Whether the run's end was seen, or following it stopped (see `result()`)."""
        return self._end is not None or self._done

    @property
    def end(self) -> WorkflowEvent | None:
        """The terminal event (`run.completed`, `run.failed`, `run.canceled`), once received."""
        return self._end

    # ----------------------------------------------------------------- events

    def __aiter__(self) -> AsyncIterator[WorkflowEvent]:
        return self.events()

    async def events(self) -> AsyncGenerator[WorkflowEvent, None]:
        """The run's events, from the first one this handle received, in order, each once;
        waits for new ones and ends after the terminal event. Raises what stopped the
        following: `UnavailableError` when the server stayed unreachable for
        `connect_timeout`, `ConnectionLostError` once the handle (or its agent or client) is
        closed, `WorkflowNotFoundError` for an unknown run."""
        index = 0
        while True:
            await self._wait(lambda: index < len(self._events))  # noqa: B023 (called at once)
            if index < len(self._events):
                event = self._events[index]
                index += 1
                yield event
                if event.terminal:
                    return
            elif self._error is not None:
                raise self._error
            else:
                return

    async def result(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Wait for the run to end; its outputs (an object from each output step's id to its
        output) when it completed.

        Raises `WorkflowFailedError` (`.state` failed or canceled, `.step_id`, `.reason`) when
        it ended otherwise, `RequestTimeoutError` (a `TimeoutError`) when it has not ended
        within `timeout` seconds (None: as long as it takes; the run goes on), and what
        stopped the following otherwise (see `events()`).
        """
        if timeout is not None and not timeout > 0:
            raise InvalidArgumentError("timeout must be positive", metadata={"field": "timeout"})
        try:
            async with asyncio.timeout(timeout):
                await self._wait(lambda: self._end is not None)
        except TimeoutError as exc:
            if isinstance(exc, RequestTimeoutError):
                raise
            raise RequestTimeoutError(
                f"workflow run {self._id} did not end within {timeout:g}s",
                metadata={"run_id": self._id},
            ) from None
        end, final = self._end, self._final
        if end is not None:
            if end.kind is WorkflowEventKind.RUN_COMPLETED:
                return end.payload
            raise WorkflowFailedError.of_event(end)
        if final is not None:
            if final.state is WorkflowRunState.COMPLETED:
                return final.outputs
            raise WorkflowFailedError.of_info(final)
        raise self._error or ConnectionLostError(
            f"the stream of workflow run {self._id} ended before the run"
        )

    # ----------------------------------------------------------------- actions

    async def get(self) -> WorkflowInfo:
        """The run as the server knows it now: state, every step, outputs or error."""
        return await self._calls.get(self._id)

    async def cancel(self, reason: str = "") -> WorkflowInfo:
        """Cancel the run: its running steps' tasks are canceled and it ends `canceled`. The
        run after it; `WorkflowStateError` if it has ended already."""
        return await self._calls.cancel(self._id, reason)

    async def close(self) -> None:
        """Stop following the run (idempotent); the run goes on. Events received so far stay
        readable; waiting for more raises `ConnectionLostError`."""
        pump, self._pump = self._pump, None
        if self._error is None and not self._done:
            self._error = ConnectionLostError(
                f"stopped following workflow run {self._id} (the handle was closed)",
                metadata={"channel": "closed"},
            )
        self._done = True
        self._notify()
        if pump is not None and not pump.done():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    async def __aenter__(self) -> RunHandle:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<RunHandle {self._id}>"

    # ----------------------------------------------------------------- the follower

    async def _wait(self, ready: Callable[[], bool]) -> None:
        """Until `ready()` holds or following ended."""
        if self._pump is None and not self._done:
            self._pump = asyncio.create_task(self._follow(), name=f"agentpost-run-{self._id}")
        while not ready() and not self._done:
            await self._news.wait()

    def _notify(self) -> None:
        news, self._news = self._news, asyncio.Event()
        news.set()

    async def _follow(self) -> None:
        calls = self._calls
        try:
            stream = calls.follow(self._id, self._after_seq, self._definition)
            async with contextlib.aclosing(stream) as events:
                async for event in events:
                    if event.run_id:
                        self._id = event.run_id
                    if event.terminal:
                        self._end = event
                    self._events.append(event)
                    self._notify()
            if self._end is None:  # the log ended at or before `after_seq`: ask the record
                self._final = await calls.get(self._id)
        except asyncio.CancelledError:
            # Closed: the handle (cancels this task) or the channel (cancels the call).
            if self._error is None:
                self._error = ConnectionLostError(
                    f"stopped following workflow run {self._id} (the connection was closed)",
                    metadata={"channel": "closed"},
                )
            raise
        except AgentpostError as exc:
            self._error = exc
        except Exception as exc:  # a bug: the waiters must not hang
            logger.exception("following workflow run %s failed", self._id)
            self._error = AgentpostError(f"following workflow run {self._id} failed: {exc!r}")
        finally:
            self._done = True
            self._notify()
