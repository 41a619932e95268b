"""The wire protocol, driven with raw generated stubs: bad input gets the right status and
ErrorInfo reason, and the server keeps serving everyone else."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentpost.v1 import errors_pb2, messaging_pb2, messaging_pb2_grpc, payload_pb2

pytestmark = pytest.mark.asyncio


def reason_of(err: grpc.aio.AioRpcError) -> str:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    assert info.domain == "agentpost"
                    return info.reason
    raise AssertionError(f"no ErrorInfo on {err}")


def intro(agent_id: str) -> messaging_pb2.ConnectRequest:
    op = messaging_pb2.ClientOperation(operation_id="intro")
    op.introduce.agent_id = agent_id
    return messaging_pb2.ConnectRequest(operations=[op])


async def frames(
    *items: messaging_pb2.ConnectRequest, hold: asyncio.Event | None = None
) -> AsyncIterator[messaging_pb2.ConnectRequest]:
    for item in items:
        yield item
    if hold is not None:
        await hold.wait()


@pytest.fixture
async def stub(target: str) -> AsyncIterator[messaging_pb2_grpc.AgentMessagingStub]:
    async with grpc.aio.insecure_channel(target) as channel:
        yield messaging_pb2_grpc.AgentMessagingStub(channel)


async def test_health_is_serving(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "agentpost.v1.AgentMessaging"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_connect_must_start_with_an_introduction(stub) -> None:
    op = messaging_pb2.ClientOperation(operation_id="1")
    op.send.to = "bob"
    call = stub.Connect(frames(messaging_pb2.ConnectRequest(operations=[op])))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "PROTOCOL_VIOLATION"
    assert "introduce" in caught.value.details()


async def test_invalid_agent_id_is_refused_with_the_rule(stub) -> None:
    call = stub.Connect(frames(intro("no spaces allowed")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "INVALID_AGENT_ID"
    assert "1-128 characters" in caught.value.details()


async def test_operations_are_answered_with_their_operation_id(stub) -> None:
    hold = asyncio.Event()
    bad_topic = messaging_pb2.ClientOperation(operation_id="op-topic")
    bad_topic.publish.topic = "a..b"
    empty = messaging_pb2.ClientOperation(operation_id="op-empty")
    again = messaging_pb2.ClientOperation(operation_id="op-again")
    again.introduce.agent_id = "alice"
    sub = messaging_pb2.ClientOperation(operation_id="op-sub")
    sub.subscribe.patterns.append("news.>")
    batch = messaging_pb2.ConnectRequest(operations=[bad_topic, empty, again, sub])
    call = stub.Connect(frames(intro("alice"), batch, hold=hold))
    answers: dict[str, messaging_pb2.ServerEvent] = {}
    async for response in call:
        for event in response.events:
            answers[event.operation_id] = event
        if len(answers) == 5:
            break
    hold.set()
    call.cancel()
    assert answers["intro"].HasField("welcome")
    assert answers["op-topic"].error.reason == errors_pb2.ERROR_REASON_INVALID_TOPIC
    assert answers["op-empty"].error.reason == errors_pb2.ERROR_REASON_PROTOCOL_VIOLATION
    assert answers["op-again"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers["op-sub"].HasField("accepted")


async def test_malformed_bytes_get_invalid_argument_and_the_server_keeps_serving(target, stub):
    async with grpc.aio.insecure_channel(target) as channel:
        raw_send = channel.unary_unary("/agentpost.v1.AgentMessaging/Send")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw_send(b"\xff\xff\xff\xff")
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason_of(caught.value) == "INVALID_ARGUMENT"
    agents = await stub.ListAgents(messaging_pb2.ListAgentsRequest())
    assert isinstance(agents, messaging_pb2.ListAgentsResponse)


async def test_payload_over_the_limit_is_resource_exhausted(start_server) -> None:
    app = await start_server(max_payload_bytes=1000)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = messaging_pb2_grpc.AgentMessagingStub(channel)
        request = messaging_pb2.PublishRequest(
            topic="big", payload=payload_pb2.Payload(data=b"x" * 2000)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Publish(request)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason_of(caught.value) == "PAYLOAD_TOO_LARGE"
        ok = messaging_pb2.PublishRequest(topic="big", payload=payload_pb2.Payload(data=b"x" * 500))
        assert (await stub.Publish(ok)).message_id


async def test_unknown_agent_and_no_responder_fail_at_once(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetAgent(messaging_pb2.GetAgentRequest(agent_id="ghost"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) == "AGENT_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Request(messaging_pb2.RequestRequest(to="ghost"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert reason_of(caught.value) == "NO_RESPONDER"


async def test_publish_needs_a_target(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Publish(messaging_pb2.PublishRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_malformed_frame_mid_session_ends_it_with_a_reason(target) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        raw_connect = channel.stream_stream("/agentpost.v1.AgentMessaging/Connect")

        async def raw_frames() -> AsyncIterator[bytes]:
            yield intro("mallory").SerializeToString()
            yield b"\xff\xff\xff"

        events = []
        async for data in raw_connect(raw_frames()):
            events.extend(messaging_pb2.ConnectResponse.FromString(data).events)
    assert events[0].HasField("welcome")
    assert events[-1].error.reason == errors_pb2.ERROR_REASON_PROTOCOL_VIOLATION


async def test_a_negative_request_timeout_is_refused_with_or_without_a_deadline(stub) -> None:
    request = messaging_pb2.RequestRequest(to="anyone", timeout={"seconds": -1})
    for deadline in (None, 5.0):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Request(request, timeout=deadline)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "timeout" in caught.value.details()
