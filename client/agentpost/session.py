"""An agent's session: one `grpc.aio` channel, one live `Connect` stream at a time (a `Link`),
reconnection with backoff, the operations waiting for their answers, the inbox of deliveries,
their acknowledgements and the request handlers.

A lost stream fails every operation in flight with `ConnectionLostError` (their outcome is
unknown) and is replaced: the agent is introduced again with its current subscriptions and the
same instance id, so the server hands the new stream what the old one had not acknowledged.
Operations issued meanwhile wait for the new stream, up to `ConnectOptions.connect_timeout`;
idempotent ones (sends, which carry an idempotency key) are sent again on it (`call_retrying`).

Deliveries go to the `Inbox` (duplicates are dropped there, and acknowledgements made as
`ConnectOptions.ack_mode` says); the link's writer adds the acknowledgements due to its frames.
With `state_path`, a `StateKeeper` keeps the instance id and the handled ids on disk (see
`_statefile`).

Task offers and news (TASK_OFFER, TASK_UPDATE deliveries) go to the `TaskDesk` instead (see
`_desk`), never to the inbox; the task RPCs are unary calls on the same channel (`Caller`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from agentpost._caller import Caller
from agentpost._desk import TaskDesk
from agentpost._inbox import Inbox
from agentpost._link import (
    ConnectCall,
    Link,
    LinkState,
    check_size,
    frame_piece,
    handshake,
    reply_operation_id,
)
from agentpost._statefile import KEPT_IDS, StateFile, StateKeeper
from agentpost._taskcalls import TaskCalls
from agentpost.config import ConnectOptions
from agentpost.errors import (
    AgentpostError,
    ConnectionLostError,
    InternalError,
    InvalidArgumentError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnavailableError,
)
from agentpost.message import Message
from agentpost.payload import fill_headers, fill_payload
from agentpost.v1 import envelope_pb2, errors_pb2, messaging_pb2, messaging_pb2_grpc

__all__ = ["RequestHandler", "Session"]

logger = logging.getLogger(__name__)

#: Answers a request: its return value becomes the reply's payload; raising sends an error reply.
RequestHandler = Callable[[Message], Awaitable[Any]]

_CONNECT_METHOD = "/{}/Connect".format(
    messaging_pb2.DESCRIPTOR.services_by_name["AgentMessaging"].full_name
)
_RETRYABLE = (UnavailableError, InternalError, RequestTimeoutError)
_REQUEST_MARGIN = 1.0  # the client-side timer of a request fires this long after the server's
_CLOSE_GRACE = 1.0  # how long close() waits for the server to end the stream after a goodbye
_MAX_ERROR_TEXT = 2048
_TASK_KINDS = (envelope_pb2.MESSAGE_KIND_TASK_OFFER, envelope_pb2.MESSAGE_KIND_TASK_UPDATE)


class Session:
    """The machinery behind `Agent`: see the module docstring."""

    def __init__(
        self, target: str, introduce: messaging_pb2.Introduce, options: ConnectOptions
    ) -> None:
        self.target = target
        self.options = options
        self.handler: RequestHandler | None = None
        self.subscriptions: set[str] = set(introduce.subscriptions)
        self.inbox = Inbox(options, acks_due=self._acks_due, handled=self._state_changed)
        self._introduce = introduce
        self._introduce.max_unacked = options.max_unacked
        self._keeper: StateKeeper | None = None
        self._channel = options.open_channel(target)
        self._connect: grpc.aio.StreamStreamMultiCallable[bytes, messaging_pb2.ConnectResponse]
        self._connect = self._channel.stream_stream(
            _CONNECT_METHOD, None, messaging_pb2.ConnectResponse.FromString
        )
        stub = messaging_pb2_grpc.AgentMessagingStub(self._channel)
        #: The unary calls of this agent, on the session's channel.
        self.caller = Caller(lambda: stub, agent_id=introduce.agent_id, options=options)
        #: Task offers and news from the mailbox (never shown by `messages()`).
        self.desk = TaskDesk(
            TaskCalls(self.caller), agent_id=introduce.agent_id, inbox=self.inbox, options=options
        )
        self._link: Link | None = None
        self._ready = asyncio.Event()
        self._failure: AgentpostError | None = None
        self._closed = False
        self._warned = False  # about a window larger than the buffer
        self._op_ids = map(str, itertools.count(1))  # operation ids: "1", "2", ...
        self._supervisor: asyncio.Task[None] | None = None
        self._run: asyncio.Task[AgentpostError] | None = None  # the current link's
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(options.max_concurrent_handlers)

    # ----------------------------------------------------------------- lifecycle

    @property
    def welcome(self) -> messaging_pb2.Welcome:
        """The Welcome of the current (or last) stream."""
        if self._link is None:
            raise ConnectionLostError("the session is not connected")
        return self._link.welcome

    @property
    def instance_id(self) -> str:
        return self._introduce.instance_id

    async def open(self) -> None:
        """Load the state, connect and introduce the agent, retrying until `connect_timeout`."""
        self._load_state()
        timeout = self.options.connect_timeout
        last: AgentpostError | None = None
        backoff = self.options.reconnect_initial_backoff
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        link = await self._open_link()
                        break
                    except _RETRYABLE as exc:
                        last = exc
                    await asyncio.sleep(_jitter(backoff))
                    backoff = min(backoff * 2, self.options.reconnect_max_backoff)
        except TimeoutError as exc:
            if isinstance(exc, AgentpostError):
                raise
            why = f": {last.message}" if last is not None else ""
            raise ConnectionLostError(
                f"cannot connect to {self.target} within {timeout:g}s{why}"
            ) from None
        self._install(link)
        self._supervisor = asyncio.create_task(self._supervise(link), name="agentpost-session")
        if self._keeper is not None:
            self._track(asyncio.create_task(self._keeper.run(), name="agentpost-state"))

    def _load_state(self) -> None:
        options, introduce = self.options, self._introduce
        kept_id: str | None = None
        handled: list[str] = []
        if options.state_path is not None:
            file = StateFile(options.state_path, introduce.agent_id)
            kept_id, handled = file.open()
            self._keeper = StateKeeper(file, self._snapshot)
        introduce.instance_id = options.instance_id or kept_id or uuid.uuid4().hex
        if options.handled_ids:
            handled = [*handled, *options.handled_ids]
        if self._keeper is None:
            if options.handled_ids:
                self.inbox.restore(handled, keep=0)
            return
        self.inbox.restore(handled, keep=min(KEPT_IDS, options.dedupe_memory))
        try:
            self._keeper.flush()  # the instance id must survive a crash before any ack
        except OSError as exc:
            raise InvalidArgumentError(
                f"cannot write state file {self._keeper.file.path}: {exc.strerror or exc}",
                metadata={"field": "state_path"},
            ) from None

    def _snapshot(self) -> tuple[str, list[str]]:
        return self._introduce.instance_id, self.inbox.ledger.recent_acked()

    def _state_changed(self) -> None:
        if self._keeper is not None:
            self._keeper.changed()

    async def close(self, *, abort: bool = False) -> None:
        """End the session: cancel handlers, send the acknowledgements due, say goodbye on the
        stream, close the channel. Idempotent.

        Messages that `messages()` holds are acknowledged first, unless `abort` (the agent is
        closed by an exception: they may not be handled, so they come again).
        """
        if self._closed:
            return
        self._closed = True
        self.inbox.close(abort=abort)
        self._fail(ConnectionLostError("the agent is closed"), report=False)
        current = asyncio.current_task()
        try:
            await self.desk.close()
            supervisor = self._supervisor
            if supervisor is not None and supervisor is not current:
                supervisor.cancel()  # no new streams from now on
                await asyncio.wait([supervisor])
            tasks = [t for t in self._tasks if t is not current and t is not self._run]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            link = self._link
            if link is not None and link.state is not LinkState.CLOSED:
                await link.finish(_CLOSE_GRACE)
            if self._run is not None and self._run is not current:
                self._run.cancel()
                await asyncio.wait([self._run])
        finally:
            try:
                self._save_state()
            finally:
                await self._channel.close(None)

    def _save_state(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        try:
            keeper.flush()
        except OSError as exc:
            logger.warning("cannot write the state file %s: %s", keeper.file.path, exc)
        finally:
            keeper.file.close()

    def _install(self, link: Link) -> None:
        self._link = link
        self._run = asyncio.create_task(link.run(), name="agentpost-link")
        self._track(self._run)
        self._ready.set()
        welcome = link.welcome
        if welcome.instance_id and welcome.instance_id != self._introduce.instance_id:
            logger.info("the server named this instance %s", welcome.instance_id)
            self._introduce.instance_id = welcome.instance_id
            self._state_changed()
        if welcome.max_unacked > self.options.max_buffered_messages and not self._warned:
            self._warned = True
            logger.warning(
                "the server's flow-control window (%d) is larger than max_buffered_messages "
                "(%d): set ConnectOptions.max_unacked to at most the buffer",
                welcome.max_unacked,
                self.options.max_buffered_messages,
            )
        # A stream that was going away may have applied (un)subscriptions after this one's
        # introduction was written: bring the new stream up to date.
        introduced = link.introduced_subscriptions
        for kind, patterns in (
            ("subscribe", self.subscriptions - introduced),
            ("unsubscribe", introduced - self.subscriptions),
        ):
            if patterns:
                operation = messaging_pb2.ClientOperation()
                getattr(operation, kind).patterns.extend(sorted(patterns))
                op_id, piece = self._encode(link, operation)
                link.accepts[op_id] = None
                link.submit(piece)

    def _fail(self, error: AgentpostError, *, report: bool = True) -> None:
        """No more streams: wake the waiters with `error`, end the inbox."""
        self._failure = error
        self._ready.set()
        self.inbox.end(error if report else None)
        self.desk.end(error if report else None)

    async def _supervise(self, link: Link) -> None:
        try:
            while True:
                run = self._run
                assert run is not None  # started by _install
                await link.unusable.wait()
                self._ready.clear()
                if run.done() and not run.cancelled() and run.exception() is None:
                    logger.warning("agentpost session lost: %s", run.result().message)
                link = await self._reconnect()
                self._install(link)
                logger.info("agentpost session re-established", extra={"target": self.target})
        except AgentpostError as exc:
            logger.error("agentpost session cannot reconnect: %s", exc.message)
            self._fail(exc)
        except Exception:
            logger.exception("agentpost session failed")
            self._fail(InternalError("the session failed; see the log"))

    async def _reconnect(self) -> Link:
        backoff = self.options.reconnect_initial_backoff
        while True:
            await asyncio.sleep(_jitter(backoff))
            backoff = min(backoff * 2, self.options.reconnect_max_backoff)
            try:
                async with asyncio.timeout(self.options.connect_timeout):
                    return await self._open_link()
            except _RETRYABLE as exc:
                logger.debug("reconnect failed: %s", exc.message)
            except TimeoutError:
                logger.debug("reconnect timed out")

    async def _open_link(self) -> Link:
        call: ConnectCall = self._connect(
            None, wait_for_ready=True, metadata=self.options.call_metadata() or None
        )
        introduce = messaging_pb2.ClientOperation(operation_id=self._next_id())
        introduce.introduce.CopyFrom(self._introduce)
        del introduce.introduce.subscriptions[:]
        introduce.introduce.subscriptions.extend(sorted(self.subscriptions))
        try:
            welcome, backlog = await handshake(call, introduce)
        except BaseException:
            call.cancel()
            raise
        drain = self.options.request_timeout + _REQUEST_MARGIN
        link = Link(
            call,
            welcome,
            self._deliver,
            backlog=backlog,
            drain_timeout=drain,
            take_acks=self._take_acks,
        )
        link.introduced_subscriptions = frozenset(introduce.introduce.subscriptions)
        return link

    # ----------------------------------------------------------------- operations

    async def call(self, operation: messaging_pb2.ClientOperation) -> messaging_pb2.Accepted:
        """Send an operation on the current stream; its Accepted, or the server's error.

        Only for the operations the server answers with `accepted` (not requests, not replies).
        """
        link = self._link
        if link is None or link.state is not LinkState.OPEN:
            link = await self._wait_link()
        op_id, piece = self._encode(link, operation)
        accepted: asyncio.Future[messaging_pb2.Accepted] = (
            asyncio.get_running_loop().create_future()
        )
        link.accepts[op_id] = accepted
        link.submit(piece)
        try:
            return await accepted
        finally:
            if not accepted.done():
                link.accepts.pop(op_id, None)

    async def call_retrying(
        self, operation: messaging_pb2.ClientOperation
    ) -> messaging_pb2.Accepted:
        """`call()` for an idempotent operation: when the connection is lost (or the server is
        unavailable) before the answer, send it again, on the next stream, until
        `connect_timeout` after the first failure."""
        try:
            return await self.call(operation)
        except UnavailableError as exc:
            if self._failure is not None:
                raise
            last = exc
        timeout = self.options.connect_timeout
        backoff = self.options.reconnect_initial_backoff
        try:
            async with asyncio.timeout(timeout):
                while True:
                    logger.info("sending operation again (%s)", last.message)
                    try:
                        return await self.call(operation)
                    except UnavailableError as exc:
                        if self._failure is not None:
                            raise
                        last = exc
                    if not isinstance(last, ConnectionLostError):  # refused: not a new stream
                        await asyncio.sleep(_jitter(backoff))
                        backoff = min(backoff * 2, self.options.reconnect_max_backoff)
        except TimeoutError as exc:
            if isinstance(exc, AgentpostError):
                raise
            raise type(last)(
                f"not sent within {timeout:g}s: {last.message}", metadata=last.metadata
            ) from None

    async def request(
        self, operation: messaging_pb2.ClientOperation, seconds: float
    ) -> envelope_pb2.Envelope:
        """Send a request; its reply Envelope, or the server's error (or a client-side timeout)."""
        link = self._link
        if link is None or link.state is not LinkState.OPEN:
            link = await self._wait_link()
        op_id, piece = self._encode(link, operation)
        reply: asyncio.Future[envelope_pb2.Envelope] = asyncio.get_running_loop().create_future()
        link.replies[op_id] = reply
        link.submit(piece)
        scope = asyncio.timeout(seconds + _REQUEST_MARGIN)
        try:
            async with scope:
                return await reply
        except TimeoutError:
            if scope.expired():
                raise RequestTimeoutError(f"no reply within {seconds:g}s") from None
            raise
        finally:
            if not reply.done():
                link.replies.pop(op_id, None)

    async def subscribe(self, patterns: Iterable[str], durable: str = "") -> None:
        """Subscribe; a `durable` subscription is kept by the server (not re-introduced)."""
        operation = messaging_pb2.ClientOperation()
        operation.subscribe.patterns.extend(patterns)
        operation.subscribe.durable_name = durable
        await self.call(operation)
        if not durable:
            self.subscriptions.update(operation.subscribe.patterns)

    async def unsubscribe(self, patterns: Iterable[str], durable: str = "") -> None:
        """Stop live patterns, and delete the `durable` subscription if one is named."""
        operation = messaging_pb2.ClientOperation()
        operation.unsubscribe.patterns.extend(patterns)
        operation.unsubscribe.durable_name = durable
        await self.call(operation)
        self.subscriptions.difference_update(operation.unsubscribe.patterns)

    async def _wait_link(self) -> Link:
        timeout = self.options.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                while True:
                    if self._failure is not None:
                        raise _copy(self._failure)
                    link = self._link
                    if link is not None and link.state is LinkState.OPEN:
                        return link
                    await self._ready.wait()
                    if self._link is link and self._failure is None:
                        self._ready.clear()  # stale wake-up: the old link is still installed
        except TimeoutError as exc:
            if isinstance(exc, AgentpostError):
                raise
            raise ConnectionLostError(f"not reconnected within {timeout:g}s") from None

    def _next_id(self) -> str:
        return next(self._op_ids)

    def _encode(self, link: Link, operation: messaging_pb2.ClientOperation) -> tuple[str, bytes]:
        op_id = operation.operation_id = next(self._op_ids)
        return op_id, _frame(link, operation)

    # ----------------------------------------------------------------- acknowledgements

    def _acks_due(self) -> None:
        link = self._link
        if link is not None:
            link.wake()

    def _take_acks(self, link: Link) -> bytes | None:
        """For the writer of `link`: one framed Acknowledge for the delivery ids due, if any."""
        if link is not self._link:
            return None
        delivery_ids = self.inbox.take_acks()
        if delivery_ids is None:
            return None
        operation = messaging_pb2.ClientOperation(operation_id=self._next_id())
        operation.ack.delivery_ids.extend(delivery_ids)
        return frame_piece(operation.SerializeToString())

    # ----------------------------------------------------------------- deliveries

    async def _deliver(self, link: Link, event: messaging_pb2.ServerEvent) -> None:
        if self._closed:
            return  # neither shown nor acknowledged: the server delivers it again later
        envelope = event.delivery
        kind = envelope.kind
        if kind in _TASK_KINDS:
            self.desk.deliver(event)
            return
        if kind != envelope_pb2.MESSAGE_KIND_REQUEST:
            await self.inbox.deliver(event)
            return
        # Requests carry no delivery id: they are answered, not acknowledged.
        replier = functools.partial(self._reply, link)
        message = Message.from_envelope(envelope, replier=replier)
        handler = self.handler
        if handler is not None:
            await self._slots.acquire()
            self._track(asyncio.create_task(self._handle(link, message, handler)), slot=True)
            return
        await self.inbox.put(message)

    async def _reply(
        self,
        link: Link,
        request_id: str,
        payload: Any,
        headers: Mapping[str, str] | None,
        content_type: str | None,
    ) -> None:
        """`Message.reply`: queue the reply on the stream its request came from. The server
        answers a reply only when it refuses it; the link logs that."""
        operation = messaging_pb2.ClientOperation()
        reply = operation.reply
        reply.correlation_id = request_id
        fill_payload(reply.payload, payload, content_type=content_type)
        if headers:
            fill_headers(reply.headers, headers)
        if link.state is LinkState.CLOSED:
            raise ConnectionLostError("the stream this request came from is gone")
        operation.operation_id = reply_operation_id(request_id)
        link.submit(_frame(link, operation))

    async def _handle(self, link: Link, request: Message, handler: RequestHandler) -> None:
        operation = messaging_pb2.ClientOperation()
        reply = operation.reply
        reply.correlation_id = request.id
        try:
            result = handler(request)
            if inspect.isawaitable(result):
                result = await result
            fill_payload(reply.payload, result)
        except Exception as exc:
            logger.warning(
                "request handler failed on %s from %s", request.id, request.sender, exc_info=True
            )
            reply.ClearField("payload")
            reply.error.CopyFrom(handler_error(exc))
        if link.state is LinkState.CLOSED:
            logger.info("dropping the reply to %s: its stream is gone", request.id)
            return
        # The server answers a reply only when it refuses it: nothing to wait for (the link
        # logs a refusal).
        operation.operation_id = reply_operation_id(request.id)
        try:
            piece = _frame(link, operation)
        except PayloadTooLargeError as exc:
            operation.reply.ClearField("payload")
            operation.reply.error.CopyFrom(handler_error(exc))
            piece = _frame(link, operation)
        link.submit(piece)

    def _track(self, task: asyncio.Task[Any], *, slot: bool = False) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if slot:
            task.add_done_callback(lambda _: self._slots.release())

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("agentpost task %s failed", task.get_name(), exc_info=exc)


def handler_error(exc: BaseException) -> errors_pb2.Error:
    """The Error a failed handler replies with: HANDLER_FAILED, "TypeName: text"."""
    text = f"{type(exc).__name__}: {exc}"
    if len(text) > _MAX_ERROR_TEXT:
        text = text[: _MAX_ERROR_TEXT - 3] + "..."
    return errors_pb2.Error(
        code=grpc.StatusCode.UNKNOWN.value[0],
        reason=errors_pb2.ERROR_REASON_HANDLER_FAILED,
        message=text,
    )


def _frame(link: Link, operation: messaging_pb2.ClientOperation) -> bytes:
    """The framed piece of an operation (its id set), checked against the server's size limit."""
    data = operation.SerializeToString()
    limit = link.max_payload_bytes
    if limit and len(data) > limit:
        check_size(operation, limit)
    return frame_piece(data)


def _jitter(delay: float) -> float:
    return delay * random.uniform(0.5, 1.5)


def _copy(error: AgentpostError) -> AgentpostError:
    return type(error)(error.message, metadata=error.metadata)
