"""The configurable limits: each one hit, reported with its status, and a per-operation limit
leaves the session up."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

import agentpost
from agentpost.errors import InvalidArgumentError, LimitExceededError, RateLimitedError
from agentpost.v1 import messaging_pb2, messaging_pb2_grpc
from tests.conftest import StartServer


def _target(app: object) -> str:
    return f"127.0.0.1:{app.port}"  # type: ignore[attr-defined]


async def test_headers_count_and_size(start_server: StartServer) -> None:
    app = await start_server(max_headers=2, max_header_bytes=64)
    async with agentpost.connect(_target(app), agent_id="alice") as alice:
        await alice.send("alice", 1, headers={"a": "1", "b": "2"})
        with pytest.raises(LimitExceededError) as many:
            await alice.send("alice", 1, headers={"a": "1", "b": "2", "c": "3"})
        assert many.value.metadata == {"limit": "max_headers", "max": "2"}
        with pytest.raises(LimitExceededError) as big:
            await alice.publish("t.x", 1, headers={"a": "x" * 100})
        assert big.value.metadata["limit"] == "max_header_bytes"
        await alice.send("alice", "the session is still up")
    async with agentpost.Client(_target(app), agent_id="bob") as client:
        with pytest.raises(LimitExceededError):
            await client.send("alice", 1, headers={"a": "1", "b": "2", "c": "3"})


async def test_sessions_per_agent(start_server: StartServer) -> None:
    app = await start_server(max_sessions_per_agent=2)
    options = [agentpost.ConnectOptions(instance_id=f"i{n}", connect_timeout=3) for n in range(3)]
    async with (
        agentpost.connect(_target(app), agent_id="alice", options=options[0]),
        agentpost.connect(_target(app), agent_id="alice", options=options[1]),
    ):
        with pytest.raises(LimitExceededError) as third:
            await agentpost.connect(_target(app), agent_id="alice", options=options[2])
        assert third.value.metadata == {"limit": "max_sessions_per_agent", "max": "2"}
    async with agentpost.connect(_target(app), agent_id="alice", options=options[2]):
        pass  # room again once the others left


async def test_inflight_requests_per_session(start_server: StartServer) -> None:
    app = await start_server(max_inflight_requests=2)
    release = asyncio.Event()
    async with (
        agentpost.connect(_target(app), agent_id="slow") as slow,
        agentpost.connect(_target(app), agent_id="asker") as asker,
    ):

        @slow.on_request
        async def wait(message: agentpost.Message) -> str:
            await release.wait()
            return "done"

        pending = [asyncio.create_task(asker.request("slow", n, timeout=10)) for n in range(2)]
        await asyncio.sleep(0)  # both are written before the third
        with pytest.raises(LimitExceededError) as third:
            await asker.request("slow", 3, timeout=10)
        assert third.value.metadata == {"limit": "max_inflight_requests", "max": "2"}
        release.set()
        assert [r.payload for r in await asyncio.gather(*pending)] == ["done", "done"]
        assert (await asker.request("slow", 4, timeout=10)).payload == "done"


async def test_rate_limit_with_retry_after(start_server: StartServer) -> None:
    app = await start_server(rate_limit=2, rate_burst=3)
    async with agentpost.connect(_target(app), agent_id="chatty") as chatty:
        for n in range(3):
            await chatty.send("chatty", n)
        with pytest.raises(RateLimitedError) as limited:
            await chatty.publish("news.x", "one too many")
        assert 0 < limited.value.retry_after <= 0.5
        await asyncio.sleep(limited.value.retry_after)
        await chatty.send("chatty", "allowed again")  # the session stayed up
    # Unary: RESOURCE_EXHAUSTED with ErrorInfo reason RATE_LIMITED and retry_after_ms.
    async with grpc.aio.insecure_channel(_target(app)) as channel:
        stub = messaging_pb2_grpc.AgentMessagingStub(channel)
        request = messaging_pb2.PublishRequest(topic="news.y")
        metadata = (("agentpost-agent-id", "loud"),)
        codes = []
        for _ in range(5):
            try:
                await stub.Publish(request, metadata=metadata, timeout=5)
                codes.append("OK")
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code().name)
                failure = exc
        assert codes[:3] == ["OK"] * 3 and codes[3] == "RESOURCE_EXHAUSTED"
        info = _error_info(failure)
        assert info.reason == "RATE_LIMITED"
        assert int(info.metadata["retry_after_ms"]) > 0


async def test_payload_depth_and_subscriptions(start_server: StartServer) -> None:
    app = await start_server(max_payload_depth=3, max_subscriptions=2)
    async with agentpost.connect(_target(app), agent_id="deep") as agent:
        await agent.send("deep", {"a": {"b": [1]}})
        with pytest.raises(InvalidArgumentError) as deep:
            await agent.send("deep", {"a": {"b": [[1]]}})
        assert deep.value.metadata["limit"] == "max_payload_depth"
        await agent.subscribe("a.one", "a.two")
        with pytest.raises(LimitExceededError) as subs:
            await agent.subscribe("a.three")
        assert subs.value.metadata["limit"] == "max_subscriptions"
        await agent.send("deep", "still up")


def _error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError("no ErrorInfo")
