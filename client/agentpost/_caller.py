"""`Caller`: the unary and server-streaming calls of one identity on one channel.

The one place that knows who the caller is on the wire (today the `agentpost-agent-id` request
metadata; a credential later), the deadline of a unary call, the retry policy of idempotent
calls, and the conversion of `grpc.RpcError` into the `AgentpostError` it stands for. `Client`
uses it on its own channel, an `Agent` on its session's channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message

from agentpost import _status
from agentpost.config import ConnectOptions
from agentpost.errors import ConnectionLostError, RequestTimeoutError, UnavailableError
from agentpost.v1 import messaging_pb2_grpc

__all__ = ["AGENT_ID_METADATA", "Caller", "Metadata", "Stub", "closed_error", "drain"]

#: The request metadata that names the calling agent on unary calls.
AGENT_ID_METADATA = "agentpost-agent-id"

if TYPE_CHECKING:
    Stub = messaging_pb2_grpc.AgentMessagingAsyncStub
else:
    Stub = Any  # the async stub type exists in the stubs (.pyi) only
Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")

logger = logging.getLogger(__name__)


class Caller:
    """Calls as `agent_id` ("anonymous" when None) through the stub `stub()` returns."""

    def __init__(
        self, stub: Callable[[], Stub], *, agent_id: str | None, options: ConnectOptions
    ) -> None:
        self._stub = stub
        self.agent_id = agent_id
        self.options = options
        #: The identity of every call, as request metadata.
        self.metadata: Metadata = (
            ((AGENT_ID_METADATA, agent_id),) if agent_id else ()
        ) + options.call_metadata()

    @property
    def stub(self) -> Stub:
        return self._stub()

    @property
    def timeout(self) -> float:
        """The deadline of a unary call, in seconds."""
        return self.options.request_timeout

    async def call(self, call: Awaitable[T]) -> T:
        """Await a call; a failure becomes its `AgentpostError`."""
        try:
            return await call
        except grpc.RpcError as exc:
            raise _status.from_rpc_error(exc) from None
        except grpc.aio.UsageError:
            raise closed_error() from None

    async def once(
        self, invoke: Callable[[float], Awaitable[T]], seconds: float | None = None
    ) -> T:
        """Call `invoke(timeout)` (default: `request_timeout`) once; a failure (also one
        raised when the call is made, as on a closed channel) becomes its `AgentpostError`."""
        try:
            call = invoke(self.timeout if seconds is None else seconds)
        except grpc.aio.UsageError:
            raise closed_error() from None
        return await self.call(call)

    async def call_retrying(self, invoke: Callable[[float], Awaitable[T]]) -> T:
        """Call `invoke(timeout)` until it answers, again (with backoff) after every
        `UnavailableError`, within `request_timeout` in all. Only for idempotent calls."""
        options = self.options
        loop = asyncio.get_running_loop()
        deadline = loop.time() + options.request_timeout
        backoff = options.reconnect_initial_backoff
        unavailable: UnavailableError | None = None
        while True:
            try:
                return await self.once(invoke, max(0.0, deadline - loop.time()))
            except RequestTimeoutError:
                # A retry cut short by the overall deadline: the server was unavailable until
                # then, which is the more useful thing to say.
                if unavailable is not None:
                    raise unavailable from None
                raise
            except UnavailableError as exc:
                unavailable = exc
                delay = backoff * random.uniform(0.5, 1.5)
                if loop.time() + delay >= deadline or exc.metadata.get("channel") == "closed":
                    raise
                logger.info("calling again in %.2fs: %s", delay, exc.message)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, options.reconnect_max_backoff)


def closed_error() -> ConnectionLostError:
    """What a call on a closed channel raises (the agent or the client was closed)."""
    return ConnectionLostError(
        "the connection is closed (the agent or client was closed)", metadata={"channel": "closed"}
    )


async def drain(call: Any) -> None:
    """Read the end of a stream whose last event came (the server ends it right after), so
    that the call finishes rather than being canceled (which logs noise at loop shutdown)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            while isinstance(await call.read(), Message):  # grpc's EOF is not one
                pass
