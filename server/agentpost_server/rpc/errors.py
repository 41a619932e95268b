"""Every RPC goes through one of these wrappers, which authenticate the call (`rpc.auth`: the
method asks `caller(context)` who it is) and turn exceptions into gRPC statuses with the
table in `agentpost._status`. Unknown exceptions are logged with their traceback and become
INTERNAL with a generic text: `str(exc)` is never sent to a peer."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message

from agentpost._status import to_status
from agentpost.errors import AgentpostError, InternalError
from agentpost_server.rpc.auth import Authenticated
from agentpost_server.rpc.handlers import decode

log = logging.getLogger(__name__)

S = TypeVar("S", bound=Authenticated)
Req = TypeVar("Req")
Resp = TypeVar("Resp")


#: A status travels in HTTP/2 trailers, which clients cap (gRPC: 8 KiB by default), and its text
#: goes twice (details, and the Status with the ErrorInfo): longer texts are cut, or the caller
#: would get a RESOURCE_EXHAUSTED of its own instead (a responder's error can be that long).
MAX_STATUS_TEXT = 1024


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: AgentpostError) -> NoReturn:
    code, details, trailing = to_status(_shortened(exc))
    await context.abort(code, details, trailing)
    raise AssertionError("unreachable")  # abort() raises


def _shortened(exc: AgentpostError) -> AgentpostError:
    if len(exc.message) > MAX_STATUS_TEXT:
        exc.message = exc.message[:MAX_STATUS_TEXT] + "..."
    room = MAX_STATUS_TEXT
    kept: dict[str, str] = {}
    for key, value in exc.metadata.items():
        room -= len(key) + len(value)
        if room < 0:
            break
        kept[key] = value
    exc.metadata = kept
    return exc


def _as_agentpost_error(name: str, exc: Exception) -> AgentpostError:
    if isinstance(exc, AgentpostError):
        return exc
    log.error("unhandled error in %s", name, exc_info=exc)
    return InternalError("internal error; the server log has the details")


Ctx = grpc.aio.ServicerContext[Any, Any]
UnaryMethod = Callable[[S, Req, Ctx], Awaitable[Resp]]
StreamMethod = Callable[[S, Req, Ctx], AsyncIterator[Resp]]


def unary(
    request_type: type[Message] | None,
) -> Callable[[UnaryMethod[S, Req, Resp]], Callable[[S, Any, Ctx], Awaitable[Resp]]]:
    """Authenticate, decode the raw request (unless None), map every exception to a status."""

    def decorate(method: UnaryMethod[S, Req, Resp]) -> Callable[[S, Any, Ctx], Awaitable[Resp]]:
        @functools.wraps(method)
        async def wrapper(self: S, raw: Any, context: Ctx) -> Resp:
            try:
                self.call_auth.enter(context)
                request = decode(request_type, raw) if request_type is not None else raw
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, _as_agentpost_error(method.__name__, exc))

        return wrapper

    return decorate


def streaming(
    request_type: type[Message] | None,
) -> Callable[[StreamMethod[S, Req, Resp]], Callable[[S, Any, Ctx], AsyncIterator[Resp]]]:
    """The same for methods that stream their responses."""

    def decorate(
        method: StreamMethod[S, Req, Resp],
    ) -> Callable[[S, Any, Ctx], AsyncIterator[Resp]]:
        @functools.wraps(method)
        async def wrapper(self: S, raw: Any, context: Ctx) -> AsyncIterator[Resp]:
            try:
                self.call_auth.enter(context)
                request = decode(request_type, raw) if request_type is not None else raw
                async for response in method(self, request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort(context, _as_agentpost_error(method.__name__, exc))

        return wrapper

    return decorate
