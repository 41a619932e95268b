"""The ceiling: a minimal `grpc.aio` relay with no Redis, no protobuf and no batching.

    python -m bench.relay 127.0.0.1:PORT

* `Push` (bidi stream): every request frame is one message, relayed as it is to the listener named
  by the call's `to` metadata. The response stream stays empty.
* `Listen` (server stream): the request names the listener; one empty frame says "registered",
  then each relayed message is one response frame.
* `Echo` (unary): answers with the request.
Payloads are raw bytes (no serializer), so the figures are gRPC's own per-message cost.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

SERVICE = "benchrelay.Relay"
PUSH = f"/{SERVICE}/Push"
LISTEN = f"/{SERVICE}/Listen"
ECHO = f"/{SERVICE}/Echo"

Ctx = grpc.aio.ServicerContext[Any, Any]


class Relay:
    def __init__(self) -> None:
        self._listeners: dict[bytes, asyncio.Queue[bytes]] = {}

    async def push(self, frames: AsyncIterator[bytes], context: Ctx) -> None:
        to = dict(context.invocation_metadata() or ()).get("to", "")
        name = to.encode() if isinstance(to, str) else to
        async for frame in frames:
            queue = self._listeners.get(name)
            if queue is not None:
                queue.put_nowait(frame)

    async def listen(self, name: bytes, context: Ctx) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._listeners[name] = queue
        try:
            yield b""
            while True:
                yield await queue.get()
        finally:
            if self._listeners.get(name) is queue:
                del self._listeners[name]

    async def echo(self, request: bytes, context: Ctx) -> bytes:
        return request


async def serve(listen: str) -> None:
    relay = Relay()
    server = grpc.aio.server()
    handlers = {
        "Push": grpc.stream_stream_rpc_method_handler(relay.push),
        "Listen": grpc.unary_stream_rpc_method_handler(relay.listen),
        "Echo": grpc.unary_unary_rpc_method_handler(relay.echo),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(listen)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m bench.relay HOST:PORT", file=sys.stderr)
        return 2
    asyncio.run(serve(sys.argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
