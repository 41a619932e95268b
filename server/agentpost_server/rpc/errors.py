"""Every RPC goes through one of these wrappers, which turn exceptions into gRPC statuses with the
table in `agentpost._status`. Unknown exceptions are logged with their traceback and become
INTERNAL with a generic text: `str(exc)` is never sent to a peer."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from agentpost._status import to_status
from agentpost.errors import AgentpostError, InternalError

log = logging.getLogger(__name__)

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: AgentpostError) -> NoReturn:
    code, details, trailing = to_status(exc)
    await context.abort(code, details, trailing)
    raise AssertionError("unreachable")  # abort() raises


def _as_agentpost_error(name: str, exc: Exception) -> AgentpostError:
    if isinstance(exc, AgentpostError):
        return exc
    log.error("unhandled error in %s", name, exc_info=exc)
    return InternalError("internal error; the server log has the details")


def unary(
    method: Callable[[S, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[S, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, _as_agentpost_error(method.__name__, exc))

    return wrapper


def streaming(
    method: Callable[[S, Req, grpc.aio.ServicerContext[Any, Resp]], AsyncIterator[Resp]],
) -> Callable[[S, Req, grpc.aio.ServicerContext[Any, Resp]], AsyncIterator[Resp]]:
    @functools.wraps(method)
    async def wrapper(
        self: S, request: Req, context: grpc.aio.ServicerContext[Any, Resp]
    ) -> AsyncIterator[Resp]:
        try:
            async for response in method(self, request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, _as_agentpost_error(method.__name__, exc))

    return wrapper
