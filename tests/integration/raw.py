"""A wire-level agent on the generated stubs, for tests that inspect frames (delivery ids, acks,
windows) rather than what the SDK makes of them."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import grpc

from agentpost.v1 import messaging_pb2, messaging_pb2_grpc


class RawAgent:
    def __init__(self, target: str, agent_id: str, **introduce: object) -> None:
        self.target = target
        self.agent_id = agent_id
        self.introduce = introduce
        self.events: list[messaging_pb2.ServerEvent] = []
        self.welcome: messaging_pb2.Welcome | None = None
        self._outbox: asyncio.Queue[messaging_pb2.ClientOperation | None] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._channel: grpc.aio.Channel | None = None
        self._reader: asyncio.Task[None] | None = None
        self._welcomed = asyncio.Event()

    async def __aenter__(self) -> RawAgent:
        self._channel = grpc.aio.insecure_channel(self.target)
        stub = messaging_pb2_grpc.AgentMessagingStub(self._channel)
        call = stub.Connect(self._frames())
        self._reader = asyncio.create_task(self._read(call))
        async with asyncio.timeout(10):
            await self._welcomed.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._outbox.put(None)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    async def _frames(self) -> AsyncIterator[messaging_pb2.ConnectRequest]:
        op = messaging_pb2.ClientOperation(operation_id="intro")
        op.introduce.agent_id = self.agent_id
        for key, value in self.introduce.items():
            if isinstance(value, list):
                getattr(op.introduce, key).extend(value)
            else:
                setattr(op.introduce, key, value)
        yield messaging_pb2.ConnectRequest(operations=[op])
        while (item := await self._outbox.get()) is not None:
            yield messaging_pb2.ConnectRequest(operations=[item])

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        async for response in call:
            for event in response.events:
                if event.HasField("welcome"):
                    self.welcome = event.welcome
                    self._welcomed.set()
                elif event.HasField("keep_alive"):
                    await self._outbox.put(messaging_pb2.ClientOperation(keep_alive={}))
                else:
                    self.events.append(event)

    def deliveries(self) -> list[messaging_pb2.ServerEvent]:
        return [e for e in self.events if e.HasField("delivery")]

    async def ack(self, *delivery_ids: str) -> None:
        op = messaging_pb2.ClientOperation(operation_id=str(next(self._ids)))
        op.ack.delivery_ids.extend(delivery_ids)
        await self._outbox.put(op)
