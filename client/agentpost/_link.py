"""One `Connect` stream of a session: the handshake, the batching writer, the reader that resolves
operations and hands deliveries on, and the watchdog (keep-alives, a silent server, draining).

Operations travel pre-serialized: the caller serializes its `ClientOperation` once and the writer
joins every operation queued at that moment into ONE `ConnectRequest` frame (field 1 repeated,
so the frame is the concatenation of `tag + length + operation`), without copying messages.
Acknowledgements are not queued one by one: at every write the writer asks the session for
the delivery ids waiting (`TakeAcks`) and adds them to the frame as one `Acknowledge`. The
writer never waits for the reader, so acknowledgements go out while the reader is blocked on
a full inbox.

What answers what: most operations get `accepted` or `error` (`accepts`); a request gets its
`reply` or `error` (`replies`); a reply, an acknowledgement and a keep-alive get an answer only
when they fail. Nothing is recorded for those: a reply's operation id names its request
(`reply_operation_id`), so a refusal can be logged as what it is. An `accepted` that nobody
waits for (an older server answered a request or a reply with one) is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from agentpost import _status
from agentpost.errors import (
    AgentpostError,
    ConnectionLostError,
    PayloadTooLargeError,
    ProtocolViolationError,
    ServerShuttingDownError,
)
from agentpost.v1 import envelope_pb2, errors_pb2, messaging_pb2

if TYPE_CHECKING:
    ConnectCall = grpc.aio.StreamStreamCall[bytes, messaging_pb2.ConnectResponse]
else:
    ConnectCall = Any

logger = logging.getLogger(__name__)

#: The largest frame the writer builds from several operations (a larger single one goes alone).
MAX_FRAME_BYTES = 1024 * 1024
#: Keep-alive period assumed when the server's Welcome does not name one.
DEFAULT_KEEPALIVE = 10.0
_OPERATIONS_TAG = 0x0A  # ConnectRequest.operations: field 1, length-delimited
_SMALL_HEADS = [bytes((_OPERATIONS_TAG, size)) for size in range(0x80)]  # one-byte lengths
_REPLY_MARK = "r:"  # starts the operation id of a reply (counted operation ids are digits)

#: Hands a `delivery` event on (the session's inbox or a request handler).
Deliver = Callable[["Link", messaging_pb2.ServerEvent], Awaitable[None]]
#: The framed `Acknowledge` for the delivery ids waiting now, or None when there are none.
TakeAcks = Callable[["Link"], bytes | None]


def frame_piece(operation: bytes) -> bytes:
    """One serialized `ClientOperation` as it appears inside a serialized `ConnectRequest`."""
    size = len(operation)
    if size < 0x80:
        return _SMALL_HEADS[size] + operation
    head = bytearray((_OPERATIONS_TAG,))
    while size >= 0x80:
        head.append((size & 0x7F) | 0x80)
        size >>= 7
    head.append(size)
    return bytes(head) + operation


_KEEP_ALIVE = frame_piece(
    messaging_pb2.ClientOperation(keep_alive=messaging_pb2.KeepAlive()).SerializeToString()
)


def reply_operation_id(request_id: str) -> str:
    """The operation id of the reply to `request_id` (the server echoes it if it refuses it)."""
    return _REPLY_MARK + request_id


def check_size(operation: messaging_pb2.ClientOperation, limit: int) -> None:
    """Raise `PayloadTooLargeError` if the message is over the server's limit, which (like the
    server) counts the payload and the headers. Checked on the client so that an oversized
    frame never reaches the server's gRPC limit, which would end the whole stream."""
    which = operation.WhichOneof("operation")
    if which not in ("send", "publish", "request", "reply"):
        return
    body = getattr(operation, which)
    size = body.payload.ByteSize() + sum(len(k) + len(v) for k, v in body.headers.items())
    if size > limit:
        raise PayloadTooLargeError(
            f"the message is {size} bytes (payload and headers); the limit is {limit}",
            metadata={"limit_bytes": str(limit), "size_bytes": str(size)},
        )


class StreamEnded(Exception):
    """Raised inside a link's task group when the stream is over; carries why."""

    def __init__(self, reason: AgentpostError) -> None:
        super().__init__(reason.message)
        self.reason = reason


class LinkState(enum.Enum):
    OPEN = "open"  # takes new operations
    DRAINING = "draining"  # the server is going away: finishes what is in flight, nothing new
    CLOSED = "closed"


async def handshake(
    call: ConnectCall, introduce: messaging_pb2.ClientOperation
) -> tuple[messaging_pb2.Welcome, Sequence[messaging_pb2.ServerEvent]]:
    """Introduce the agent on a fresh stream; the Welcome and any events that came with it.

    Raises the server's error (for example `InvalidAgentIdError`) or `ConnectionLostError`.
    The caller cancels the call when this raises.
    """
    try:
        with contextlib.suppress(asyncio.InvalidStateError):  # over already: read() says why
            await call.write(frame_piece(introduce.SerializeToString()))
        response = await call.read()
    except grpc.RpcError as exc:
        raise _status.from_rpc_error(exc) from None
    if not isinstance(response, messaging_pb2.ConnectResponse):
        raise ConnectionLostError("the server ended the stream before welcoming the agent")
    events = list(response.events)
    if events and events[0].HasField("welcome"):
        return events[0].welcome, events[1:]
    if events and events[0].HasField("error"):
        raise _status.from_error_proto(events[0].error)
    raise ProtocolViolationError("the server did not answer the introduction with a welcome")


class Link:
    """A welcomed `Connect` stream. `run()` drives it until it ends; then it is CLOSED for good."""

    def __init__(
        self,
        call: ConnectCall,
        welcome: messaging_pb2.Welcome,
        deliver: Deliver,
        *,
        backlog: Sequence[messaging_pb2.ServerEvent] = (),
        drain_timeout: float = 30.0,
        take_acks: TakeAcks | None = None,
    ) -> None:
        self.welcome = welcome
        #: The largest payload (with headers) the server takes; 0: not announced.
        self.max_payload_bytes = welcome.max_payload_bytes
        self.state = LinkState.OPEN
        #: The topic patterns the introduction of this stream subscribed to.
        self.introduced_subscriptions: frozenset[str] = frozenset()
        #: Set once the link takes no new operations (going away, or ended).
        self.unusable = asyncio.Event()
        #: operation id -> the future of its Accepted (None: nobody waits, log failures).
        self.accepts: dict[str, asyncio.Future[messaging_pb2.Accepted] | None] = {}
        #: operation id -> the future of a request's reply Envelope.
        self.replies: dict[str, asyncio.Future[envelope_pb2.Envelope]] = {}
        interval = welcome.keepalive_interval.ToTimedelta().total_seconds()
        self.keepalive_interval = interval if interval > 0 else DEFAULT_KEEPALIVE
        self._call = call
        self._deliver = deliver
        self._take_acks = take_acks
        self._backlog = list(backlog)
        self._drain_timeout = drain_timeout
        self._pieces: list[bytes] = []
        self._queued_bytes = 0
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._last_read = self._last_write = self._loop.time()
        self._busy = False  # the reader waits for a consumer: not a silent server
        self._drain_deadline: float | None = None
        self._close_reason: AgentpostError | None = None
        self._finishing = False  # the writer half-closes the stream once it has nothing left
        self._closed = asyncio.Event()

    @property
    def session_id(self) -> str:
        return self.welcome.session_id

    def submit(self, piece: bytes) -> None:
        """Queue one framed operation (see `frame_piece`) for the next write."""
        self._pieces.append(piece)
        self._queued_bytes += len(piece)
        if len(self._pieces) == 1:
            self._wake.set()

    def wake(self) -> None:
        """Have the writer look for acknowledgements to send."""
        self._wake.set()

    async def finish(self, timeout: float) -> None:  # noqa: ASYNC109 (a grace period, not a call)
        """Say goodbye: write what is queued (acknowledgements too), half-close the stream, and
        wait up to `timeout` for the server to end it, so that nothing written is lost to a
        cancellation. The link is CLOSED afterwards only if the server ended it in time."""
        self._finishing = True
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._closed.wait()

    async def run(self) -> AgentpostError:
        """Read, write and watch until the stream ends; fail what is in flight; return why."""
        reason: AgentpostError = ConnectionLostError("the session ended")
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._read_loop())
                group.create_task(self._write_loop())
                group.create_task(self._watch())
        except* StreamEnded as ended:
            first = ended.exceptions[0]
            if isinstance(first, StreamEnded):
                reason = first.reason
        finally:
            self._shut(ConnectionLostError(f"connection lost: {reason.message}"))
        return reason

    def _shut(self, error: ConnectionLostError) -> None:
        self.state = LinkState.CLOSED
        self.unusable.set()
        self._closed.set()
        self._call.cancel()
        self._pieces.clear()
        accepts, replies = self.accepts, self.replies
        self.accepts, self.replies = {}, {}
        for accepted in accepts.values():
            if accepted is not None and not accepted.done():
                accepted.set_exception(_copy(error))
        for reply in replies.values():
            if not reply.done():
                reply.set_exception(_copy(error))

    async def _write_loop(self) -> None:
        write = self._call.write
        take_acks = self._take_acks
        while True:
            acks = take_acks(self) if take_acks is not None else None
            if not self._pieces and acks is None:
                if self._finishing:
                    await self._done_writing()
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._queued_bytes <= MAX_FRAME_BYTES:
                batch, self._pieces, self._queued_bytes = self._pieces, [], 0
            else:
                batch = self._take(MAX_FRAME_BYTES)
            if acks is not None:
                batch.append(acks)
            self._last_write = self._loop.time()
            try:
                await write(b"".join(batch))
            except grpc.RpcError as exc:
                raise StreamEnded(self._close_reason or _status.from_rpc_error(exc)) from None
            except asyncio.InvalidStateError:
                raise StreamEnded(self._ended()) from None

    async def _done_writing(self) -> None:
        try:
            await self._call.done_writing()
        except grpc.RpcError as exc:
            raise StreamEnded(self._close_reason or _status.from_rpc_error(exc)) from None
        except asyncio.InvalidStateError:
            raise StreamEnded(self._ended()) from None

    def _take(self, limit: int) -> list[bytes]:
        total = count = 0
        for piece in self._pieces:
            if count and total + len(piece) > limit:
                break
            total += len(piece)
            count += 1
        batch = self._pieces[:count]
        del self._pieces[:count]
        self._queued_bytes -= total
        return batch

    async def _read_loop(self) -> None:
        if self._backlog:
            backlog, self._backlog = self._backlog, []
            await self._dispatch(backlog)
        read = self._call.read
        while True:
            try:
                response = await read()
            except grpc.RpcError as exc:
                raise StreamEnded(self._close_reason or _status.from_rpc_error(exc)) from None
            if not isinstance(response, messaging_pb2.ConnectResponse):
                raise StreamEnded(self._ended())
            self._last_read = self._loop.time()
            await self._dispatch(response.events)

    async def _dispatch(self, events: Sequence[messaging_pb2.ServerEvent]) -> None:
        for event in events:
            which = event.WhichOneof("event")
            if which == "delivery":
                self._busy = True
                await self._deliver(self, event)
                self._busy = False
                self._last_read = self._loop.time()
            elif which == "accepted":
                accepted = self.accepts.pop(event.operation_id, None)
                if accepted is not None and not accepted.done():
                    accepted.set_result(event.accepted)
            elif which == "reply":
                reply = self.replies.pop(event.operation_id, None)
                if reply is not None and not reply.done():
                    reply.set_result(event.reply)
            elif which == "keep_alive":
                self.submit(_KEEP_ALIVE)
            elif which == "error":
                self._on_error(event.operation_id, event.error)
            elif which == "going_away":
                self._on_going_away(event.going_away.reason)
            else:
                logger.debug("ignoring an unexpected %s event", which)

    def _on_error(self, operation_id: str, error: errors_pb2.Error) -> None:
        exc = _status.from_error_proto(error)
        if not operation_id:
            logger.info("the server is closing the session: %s", exc.message)
            self._close_reason = exc
            return
        if operation_id in self.accepts:
            accepted = self.accepts.pop(operation_id)
            if accepted is None:
                logger.warning("the server refused an operation: %s", exc.message)
            elif not accepted.done():
                accepted.set_exception(exc)
            return
        reply = self.replies.pop(operation_id, None)
        if reply is not None:
            if not reply.done():
                reply.set_exception(exc)
            return
        if operation_id.startswith(_REPLY_MARK):
            logger.warning(
                "the server refused the reply to request %s, so the requester does not get it: %s",
                operation_id.removeprefix(_REPLY_MARK),
                exc.message,
                extra={"request_id": operation_id.removeprefix(_REPLY_MARK)},
            )
            return
        # Nobody waits for this one: an acknowledgement the server refused, for example.
        logger.warning("the server refused operation %s: %s", operation_id, exc.message)

    def _on_going_away(self, reason: str) -> None:
        logger.info("the server is going away: %s", reason or "no reason given")
        self._close_reason = ServerShuttingDownError(reason or "the server is shutting down")
        if self.state is LinkState.OPEN:
            self.state = LinkState.DRAINING
            self._drain_deadline = self._loop.time() + self._drain_timeout
            self.unusable.set()

    async def _watch(self) -> None:
        interval = self.keepalive_interval
        tick = min(1.0, interval / 2)
        while True:
            await asyncio.sleep(tick)
            now = self._loop.time()
            if not self._busy and now - self._last_read > 3 * interval:
                raise StreamEnded(ConnectionLostError("the server stopped answering"))
            if now - self._last_write >= interval and not self._pieces and not self._finishing:
                self.submit(_KEEP_ALIVE)
            if self._drain_deadline is not None and now >= self._drain_deadline:
                raise StreamEnded(self._ended())

    def _ended(self) -> AgentpostError:
        return self._close_reason or ConnectionLostError("the server ended the session")


def _copy(error: ConnectionLostError) -> ConnectionLostError:
    return ConnectionLostError(error.message, metadata=error.metadata)
