"""An agent's session: one `grpc.aio` channel, one live `Connect` stream at a time (a `Link`),
reconnection with backoff, the operations waiting for their answers, the inbox of deliveries and
the request handlers.

A lost stream fails every operation in flight with `ConnectionLostError` (their outcome is
unknown) and is replaced: the agent is introduced again with its current subscriptions.
Operations issued meanwhile wait for the new stream, up to `ConnectOptions.connect_timeout`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc

from agentpost._link import ConnectCall, Link, LinkState, check_size, frame_piece, handshake
from agentpost.config import ConnectOptions
from agentpost.errors import (
    AgentpostError,
    ConnectionLostError,
    InternalError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnavailableError,
)
from agentpost.message import Message
from agentpost.payload import fill_payload
from agentpost.v1 import envelope_pb2, errors_pb2, messaging_pb2

__all__ = ["RequestHandler", "Session"]

logger = logging.getLogger(__name__)

#: Answers a request: its return value becomes the reply's payload; raising sends an error reply.
RequestHandler = Callable[[Message], Awaitable[Any]]

_CONNECT_METHOD = "/{}/Connect".format(
    messaging_pb2.DESCRIPTOR.services_by_name["AgentMessaging"].full_name
)
_RETRYABLE = (UnavailableError, InternalError, RequestTimeoutError)
_REQUEST_MARGIN = 1.0  # the client-side timer of a request fires this long after the server's
_MAX_ERROR_TEXT = 2048


class _End:
    """The inbox's last item: iteration stops (or raises `error`)."""

    def __init__(self, error: AgentpostError | None) -> None:
        self.error = error


class Session:
    """The machinery behind `Agent`: see the module docstring."""

    def __init__(
        self, target: str, introduce: messaging_pb2.Introduce, options: ConnectOptions
    ) -> None:
        self.target = target
        self.options = options
        self.handler: RequestHandler | None = None
        self.subscriptions: set[str] = set(introduce.subscriptions)
        self.inbox: asyncio.Queue[Message | _End] = asyncio.Queue(options.max_buffered_messages)
        self._introduce = introduce
        self._channel = options.open_channel(target)
        self._connect: grpc.aio.StreamStreamMultiCallable[bytes, messaging_pb2.ConnectResponse]
        self._connect = self._channel.stream_stream(
            _CONNECT_METHOD, None, messaging_pb2.ConnectResponse.FromString
        )
        self._link: Link | None = None
        self._ready = asyncio.Event()
        self._failure: AgentpostError | None = None
        self._closed = False
        self._counter = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(options.max_concurrent_handlers)

    # ----------------------------------------------------------------- lifecycle

    @property
    def welcome(self) -> messaging_pb2.Welcome:
        """The Welcome of the current (or last) stream."""
        if self._link is None:
            raise ConnectionLostError("the session is not connected")
        return self._link.welcome

    async def open(self) -> None:
        """Connect and introduce the agent, retrying until `connect_timeout`."""
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

    async def close(self) -> None:
        """End the session: cancel handlers, end the stream, close the channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fail(ConnectionLostError("the agent is closed"), report=False)
        current = asyncio.current_task()
        tasks = [t for t in (self._supervisor, *self._tasks) if t is not None and t is not current]
        try:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
        finally:
            await self._channel.close(None)

    def _install(self, link: Link) -> None:
        self._link = link
        self._ready.set()
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

    async def next_message(self) -> Message | None:
        """The next delivery; `None` once the agent is closed; raises if the session failed."""
        inbox = self.inbox
        item = inbox.get_nowait() if not inbox.empty() else await inbox.get()
        if not isinstance(item, _End):
            return item
        if not inbox.full():
            inbox.put_nowait(item)  # for the other readers, and the next messages() call
        if item.error is not None:
            raise _copy(item.error)
        return None

    def _fail(self, error: AgentpostError, *, report: bool = True) -> None:
        """No more streams: wake the waiters with `error`, end the inbox."""
        self._failure = error
        self._ready.set()
        while not self.inbox.empty():  # a closed agent drops what nobody read
            self.inbox.get_nowait()
        self.inbox.put_nowait(_End(error if report else None))

    async def _supervise(self, link: Link) -> None:
        try:
            while True:
                run = asyncio.create_task(link.run(), name="agentpost-link")
                self._track(run)
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
        call: ConnectCall = self._connect(None, wait_for_ready=True)
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
        link = Link(call, welcome, self._deliver, backlog=backlog, drain_timeout=drain)
        link.introduced_subscriptions = frozenset(introduce.introduce.subscriptions)
        return link

    # ----------------------------------------------------------------- operations

    async def call(self, operation: messaging_pb2.ClientOperation) -> messaging_pb2.Accepted:
        """Send an operation on the current stream; its Accepted, or the server's error."""
        link = self._link
        if link is None or link.state is not LinkState.OPEN:
            link = await self._wait_link()
        return await self.call_on(link, operation)

    async def call_on(
        self, link: Link, operation: messaging_pb2.ClientOperation
    ) -> messaging_pb2.Accepted:
        """Send an operation on this stream (a reply goes back where its request came from)."""
        if link.state is LinkState.CLOSED:
            raise ConnectionLostError("the stream this operation belongs to is gone")
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

    async def subscribe(self, patterns: Iterable[str]) -> None:
        operation = messaging_pb2.ClientOperation()
        operation.subscribe.patterns.extend(patterns)
        await self.call(operation)
        self.subscriptions.update(operation.subscribe.patterns)

    async def unsubscribe(self, patterns: Iterable[str]) -> None:
        operation = messaging_pb2.ClientOperation()
        operation.unsubscribe.patterns.extend(patterns)
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
        self._counter += 1
        return str(self._counter)

    def _encode(self, link: Link, operation: messaging_pb2.ClientOperation) -> tuple[str, bytes]:
        op_id = operation.operation_id = self._next_id()
        data = operation.SerializeToString()
        limit = link.welcome.max_payload_bytes
        if limit and len(data) > limit:
            check_size(operation, limit)
        return op_id, frame_piece(data)

    # ----------------------------------------------------------------- deliveries

    async def _deliver(self, link: Link, envelope: envelope_pb2.Envelope) -> None:
        if envelope.kind != envelope_pb2.MESSAGE_KIND_REQUEST:
            message = Message.from_envelope(envelope)
        else:
            replier = functools.partial(self._reply, link)
            message = Message.from_envelope(envelope, replier=replier)
            handler = self.handler
            if handler is not None:
                await self._slots.acquire()
                self._track(asyncio.create_task(self._handle(link, message, handler)), slot=True)
                return
        if self.inbox.full():
            await self.inbox.put(message)
        else:
            self.inbox.put_nowait(message)

    async def _reply(
        self,
        link: Link,
        request_id: str,
        payload: Any,
        headers: Mapping[str, str] | None,
        content_type: str | None,
    ) -> None:
        operation = messaging_pb2.ClientOperation()
        reply = operation.reply
        reply.correlation_id = request_id
        fill_payload(reply.payload, payload, content_type=content_type)
        if headers:
            reply.headers.update(headers)
        await self.call_on(link, operation)

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
        op_id, piece = self._encode_reply(link, operation)
        link.accepts[op_id] = None  # nobody waits; the link logs a refusal
        link.submit(piece)

    def _encode_reply(
        self, link: Link, operation: messaging_pb2.ClientOperation
    ) -> tuple[str, bytes]:
        try:
            return self._encode(link, operation)
        except PayloadTooLargeError as exc:
            operation.reply.ClearField("payload")
            operation.reply.error.CopyFrom(handler_error(exc))
            return self._encode(link, operation)

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


def _jitter(delay: float) -> float:
    return delay * random.uniform(0.5, 1.5)


def _copy(error: AgentpostError) -> AgentpostError:
    return type(error)(error.message, metadata=error.metadata)
