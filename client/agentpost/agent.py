"""The public face of a session: `connect()` and `Agent`.

async with agentpost.connect("127.0.0.1:50051", agent_id="planner") as agent:
    await agent.send("coder", {"task": "x"})
    reply = await agent.request("coder", {"q": 1}, timeout=5.0)
    async for message in agent.messages():
        ...

Tasks: `handoff()` hands one to another agent (or capability) and returns a `TaskHandle`
(`await handle.result()`); `tasks()` yields the `Assignment`s offered to this agent, or
`@agent.on_task` works on them with a handler. Task offers never show up in `messages()`.

Delivery is exactly once to the application, for messages it finished handling: the server
delivers at least once (until acknowledged), and the SDK drops duplicates by message id. Each
message from `messages()` is acknowledged after the loop body ran (`ConnectOptions.ack_mode`),
and the agent's instance id lets a reconnected (or, with `ConnectOptions.state_path`, a
restarted) agent take over what it had not acknowledged.
"""

from __future__ import annotations

import asyncio
import datetime
import math
from collections.abc import AsyncIterator, Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from agentpost import _keys, _status
from agentpost._desk import TaskHandler
from agentpost._keys import RETRY_KEY_PREFIX, RetryKeys
from agentpost._taskapi import TaskMethods
from agentpost._taskcalls import TaskCalls
from agentpost._workflowapi import WorkflowMethods
from agentpost._workflowcalls import WorkflowCalls
from agentpost.assignment import Assignment
from agentpost.config import ConnectOptions
from agentpost.errors import InvalidArgumentError, UnavailableError
from agentpost.message import Message
from agentpost.payload import fill_headers, fill_payload, fill_struct
from agentpost.session import RequestHandler, Session
from agentpost.v1 import messaging_pb2

__all__ = [
    "RETRY_KEY_PREFIX",
    "Agent",
    "AgentConnector",
    "RequestHandler",
    "RetryKeys",
    "TaskHandler",
    "connect",
]

H = TypeVar("H", bound=RequestHandler)
TH = TypeVar("TH", bound=TaskHandler)


def connect(
    target: str,
    *,
    agent_id: str,
    capabilities: Sequence[str] = (),
    metadata: Mapping[str, Any] | None = None,
    subscriptions: Sequence[str] = (),
    max_tasks: int = 0,
    options: ConnectOptions | None = None,
) -> AgentConnector:
    """Open a session as `agent_id` on the server at `target` ("host:port").

    Use it as `async with connect(...) as agent:` (the agent is closed at the end), or
    `agent = await connect(...)` and `await agent.close()` yourself. Raises the server's error
    (e.g. `InvalidAgentIdError`) or, when no session is established within
    `options.connect_timeout`, `ConnectionLostError`.

    `max_tasks`: at most this many tasks held at once (offered or being worked on), across the
    agent's sessions; more wait on the server, highest priority first. 0: no limit.
    """
    if isinstance(capabilities, str) or isinstance(subscriptions, str):
        raise InvalidArgumentError("capabilities and subscriptions are sequences of strings")
    if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 0:
        raise InvalidArgumentError("max_tasks must be a non-negative integer (0: no limit)")
    introduce = messaging_pb2.Introduce(
        agent_id=agent_id,
        capabilities=list(capabilities),
        subscriptions=list(subscriptions),
        max_tasks=max_tasks,
    )
    if metadata:
        fill_struct(introduce.metadata, metadata)
    return AgentConnector(target, introduce, options or ConnectOptions())


class AgentConnector:
    """What `connect()` returns: an async context manager (and an awaitable) giving an `Agent`."""

    def __init__(
        self, target: str, introduce: messaging_pb2.Introduce, options: ConnectOptions
    ) -> None:
        self._target = target
        self._introduce = introduce
        self._options = options
        self._agent: Agent | None = None

    async def _open(self) -> Agent:
        session = Session(self._target, self._introduce, self._options)
        try:
            await session.open()
        except BaseException:
            await session.close()
            raise
        return Agent(session, self._introduce.agent_id)

    def __await__(self) -> Generator[Any, None, Agent]:
        return self._open().__await__()

    async def __aenter__(self) -> Agent:
        self._agent = await self._open()
        return self._agent

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        agent, self._agent = self._agent, None
        if agent is not None:
            await agent._close(abort=exc_type is not None)


class Agent(TaskMethods, WorkflowMethods):
    """A connected agent. Get one from `connect()`; every method raises `AgentpostError`s only."""

    def __init__(self, session: Session, agent_id: str) -> None:
        self._session = session
        self._agent_id = agent_id
        self._retry_key = RetryKeys()

    # ----------------------------------------------------------------- identity

    @property
    def agent_id(self) -> str:
        return self._agent_id

    @property
    def session_id(self) -> str:
        """The id of the current stream (it changes when the session reconnects)."""
        return self._session.welcome.session_id

    @property
    def server_id(self) -> str:
        return self._session.welcome.server_id

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload the server accepts (0: not announced)."""
        return self._session.welcome.max_payload_bytes

    @property
    def keepalive_interval(self) -> datetime.timedelta:
        return self._session.welcome.keepalive_interval.ToTimedelta()

    @property
    def instance_id(self) -> str:
        """Names this instance across reconnects (and restarts, with `state_path`)."""
        return self._session.instance_id

    @property
    def max_unacked(self) -> int:
        """The flow-control window the server applies (0: not announced)."""
        return self._session.welcome.max_unacked

    @property
    def subscriptions(self) -> frozenset[str]:
        """The live topic patterns this agent receives (restored after a reconnection)."""
        return frozenset(self._session.subscriptions)

    # ----------------------------------------------------------------- sending

    async def send(
        self,
        to: str,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        ttl: float | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Send a direct message to agent `to`; the message id.

        The server keeps it in `to`'s mailbox until `to` acknowledges it, so `to` need not be
        connected; raises `AgentNotFoundError` if no agent `to` is known (connected once, or
        registered). With `ttl` (seconds), the message goes to the dead letters if it is not
        delivered in time.

        Every send carries an idempotency key: if the connection is lost before the answer,
        the send is repeated with the same key on the next stream, until `connect_timeout`,
        and the server stores the message only once. So this returns the id of a message
        stored exactly once, or raises.

        Without an `idempotency_key`, the SDK makes up a transport-retry key (it starts with
        "~"), which the server remembers only for a short retry window (two minutes by
        default; keep `connect_timeout` well below it): enough for the repeats above, not for
        retrying the call yourself later. To retry yourself (after an `UnavailableError`, or
        after a restart), pass your own key: the server remembers it for a day by default and
        answers a repeated send with the first message's id. Your own keys must not start with
        "~" (`InvalidArgumentError`). If this raises `UnavailableError` for a send with your
        own key, `error.metadata["idempotency_key"]` is that key.
        """
        operation = messaging_pb2.ClientOperation()
        send = operation.send
        send.to = to
        fill_payload(send.payload, payload, content_type=content_type)
        if headers:
            fill_headers(send.headers, headers)
        fill_send_options(send, ttl, idempotency_key, self._retry_key)
        try:
            return (await self._session.call_retrying(operation)).message_id
        except UnavailableError as exc:
            if idempotency_key is not None:  # not the short-lived key: that one is no use later
                exc.metadata.setdefault("idempotency_key", idempotency_key)
            raise

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        include_self: bool = False,
        content_type: str | None = None,
    ) -> str:
        """Publish on `topic` (no wildcards) to every subscriber; the message id."""
        operation = messaging_pb2.ClientOperation()
        publish = operation.publish
        publish.topic = topic
        return await self._publish(operation, payload, headers, include_self, content_type)

    async def broadcast(
        self,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        include_self: bool = False,
        content_type: str | None = None,
    ) -> str:
        """Send to every connected agent; the message id."""
        operation = messaging_pb2.ClientOperation()
        operation.publish.broadcast.SetInParent()
        return await self._publish(operation, payload, headers, include_self, content_type)

    async def _publish(
        self,
        operation: messaging_pb2.ClientOperation,
        payload: Any,
        headers: Mapping[str, str] | None,
        include_self: bool,
        content_type: str | None,
    ) -> str:
        publish = operation.publish
        fill_payload(publish.payload, payload, content_type=content_type)
        if headers:
            fill_headers(publish.headers, headers)
        publish.include_self = include_self
        return (await self._session.call(operation)).message_id

    async def request(
        self,
        to: str,
        payload: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the request's own deadline, sent along)
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> Message:
        """Ask agent `to` and wait for its reply (`reply.payload` is the answer).

        `timeout` defaults to `ConnectOptions.request_timeout`. Raises `NoResponderError`,
        `RequestTimeoutError`, or `HandlerError` (message "TypeName: text") when the responder's
        handler failed.
        """
        if timeout is None:
            timeout = self._session.options.request_timeout
        if timeout <= 0:
            raise InvalidArgumentError("timeout must be positive", metadata={"field": "timeout"})
        operation = messaging_pb2.ClientOperation()
        request = operation.request
        request.to = to
        fill_payload(request.payload, payload, content_type=content_type)
        if headers:
            fill_headers(request.headers, headers)
        request.timeout.FromNanoseconds(int(timeout * 1e9))
        envelope = await self._session.request(operation, timeout)
        if envelope.HasField("error"):
            raise _status.from_error_proto(envelope.error)
        return Message.from_envelope(envelope)

    # ----------------------------------------------------------------- topics

    async def subscribe(self, *patterns: str, durable: str | None = None) -> None:
        """Receive topics matching these patterns (`*` one token, `>` the rest).

        A live subscription lasts while the agent runs (it is restored after a reconnection).
        A `durable` one is kept by the server under that name: it keeps its position while the
        agent is away, every later session of the agent resumes it, and its messages must be
        acknowledged like mailbox messages.
        """
        durable_name = _durable_name(durable)
        if patterns:
            await self._session.subscribe(patterns, durable_name)
        elif durable_name:
            raise InvalidArgumentError(
                "a durable subscription needs patterns", metadata={"field": "patterns"}
            )

    async def unsubscribe(self, *patterns: str, durable: str | None = None) -> None:
        """Stop receiving these live patterns (exactly as subscribed), and delete the
        `durable` subscription of that name if one is given."""
        durable_name = _durable_name(durable)
        if patterns or durable_name:
            await self._session.unsubscribe(patterns, durable_name)

    # ----------------------------------------------------------------- receiving

    def on_request(self, handler: H) -> H:
        """Decorator: answer every request with `handler` (see `handle_requests`)."""
        self.handle_requests(handler)
        return handler

    def handle_requests(self, handler: RequestHandler | None) -> None:
        """Answer requests with `async def handler(message) -> payload` (`None` to stop).

        The return value becomes the reply's payload; an exception becomes a `HandlerError` at
        the requester. Handlers run concurrently, up to `ConnectOptions.max_concurrent_handlers`.
        Without a handler, requests arrive through `messages()` and are answered with
        `message.reply(...)`.
        """
        self._session.handler = handler

    async def messages(self) -> AsyncIterator[Message]:
        """Every delivery: direct, topic, broadcast, events (and requests, without a handler),
        each message once, even when the server delivers it again.

        With the default `ack_mode="after_handling"`, a message is acknowledged when the loop
        asks for the next one, or when the loop is left (`break`, `aclose()`), or when the
        agent is closed normally. It is not acknowledged, and comes again, if the task running
        the loop is cancelled while handling it, or if an exception ends the
        `async with connect(...)` block (an exception caught inside the block counts as
        handled: use `ack_mode="manual"` and `message.ack()` to decide per message).

        Ends when the agent is closed; raises if the session is lost for good.
        """
        inbox = self._session.inbox
        after_handling = self._session.options.ack_mode == "after_handling"
        held = ""
        consumer = asyncio.current_task()
        try:
            while True:
                if held:
                    inbox.done(held)
                    held = ""
                message = await inbox.next()
                if message is None:
                    return
                if after_handling and message.delivery_id:
                    held = message.id
                    inbox.hold(held)
                consumer = asyncio.current_task()
                yield message
        finally:
            if held:
                if _cancelled(consumer):
                    inbox.release(held)
                else:
                    inbox.done(held)

    # ----------------------------------------------------------------- tasks: originator
    # handoff, task_handle, get_task, watch_task, cancel_task, list_tasks, audit: TaskMethods

    def _task_calls(self) -> TaskCalls:
        return self._session.desk.calls

    # ----------------------------------------------------------------- tasks: assignee

    async def tasks(self) -> AsyncIterator[Assignment]:
        """The tasks offered to this agent, each once, as they come: accept or reject each.

        Offers come through the agent's mailbox (they wait there while it is away) and never
        show up in `messages()`. Each is acknowledged when this loop gets it; an offer taken
        away before (canceled, expired, offered elsewhere) is skipped. With a task handler
        (`handle_tasks`), the handler gets the offers instead. Ends when the agent is closed;
        raises if the session is lost for good.
        """
        desk = self._session.desk
        while (offer := await desk.next()) is not None:
            yield offer

    def on_task(self, handler: TH) -> TH:
        """Decorator: work on every offered task with `handler` (see `handle_tasks`)."""
        self.handle_tasks(handler)
        return handler

    def handle_tasks(self, handler: TaskHandler | None) -> None:
        """Work on offered tasks with `async def handler(task) -> result` (`None` to stop).

        Each offer is accepted, then the handler runs: its return value completes the task,
        an exception fails it ("TypeName: text", not retryable). Inside, the handler can call
        `task.progress(...)` and `await task.ask(...)`, or finish the task itself (`complete`,
        `fail`). When the task is canceled, expires or goes to another agent, the handler is
        cancelled. Handlers run concurrently, up to `ConnectOptions.max_concurrent_handlers`.
        """
        self._session.desk.set_handler(handler)

    # ----------------------------------------------------------------- workflows
    # coordinate, attach, get_workflow, list_workflows, cancel_workflow: see WorkflowMethods

    def _workflow_calls(self) -> WorkflowCalls:
        return WorkflowCalls(self._session.desk.calls.caller)

    # ----------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """End the session (idempotent); pending operations fail with `ConnectionLostError`.

        Acknowledgements due (and those of the messages `messages()` holds) are sent first.
        """
        await self._close(abort=False)

    async def _close(self, *, abort: bool) -> None:
        await self._session.close(abort=abort)

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._close(abort=exc_type is not None)

    def __repr__(self) -> str:
        return f"<Agent {self._agent_id!r} at {self._session.target}>"


def fill_send_options(
    send: messaging_pb2.SendMessage | messaging_pb2.SendRequest,
    ttl: float | None,
    idempotency_key: str | None,
    retry_key: RetryKeys,
) -> None:
    """Set a send's `ttl` (seconds) and its idempotency key (`retry_key()` when None)."""
    if ttl is not None:
        if not (ttl > 0 and math.isfinite(ttl)):
            raise InvalidArgumentError("ttl must be positive and finite", metadata={"field": "ttl"})
        send.ttl.FromNanoseconds(int(ttl * 1e9))
    idempotency_key = _keys.idempotency_key(idempotency_key, retry_key)
    send.idempotency_key = idempotency_key


def _durable_name(durable: str | None) -> str:
    if durable is not None and not durable:
        raise InvalidArgumentError(
            "durable must be a name (None: a live subscription)", metadata={"field": "durable"}
        )
    return durable or ""


def _cancelled(task: asyncio.Task[Any] | None) -> bool:
    """Whether `task` was cancelled or is being cancelled."""
    if task is None:
        return False
    return task.cancelled() if task.done() else task.cancelling() > 0
