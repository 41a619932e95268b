"""The Connect session machinery against a scriptable fake server (see conftest.py): batching,
keep-alives, answers and errors, handlers, backpressure, reconnection, going-away, closing."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import pytest

import agentpost
from agentpost.v1 import envelope_pb2, errors_pb2, messaging_pb2
from tests.helpers import assert_eventually

FAST = agentpost.ConnectOptions(
    connect_timeout=3.0, reconnect_initial_backoff=0.01, reconnect_max_backoff=0.05
)
REQUEST = envelope_pb2.MESSAGE_KIND_REQUEST


def _connect(bus: Any, **kwargs: Any) -> agentpost.AgentConnector:
    kwargs.setdefault("options", FAST)
    return agentpost.connect(bus.target, agent_id=kwargs.pop("agent_id", "me"), **kwargs)


async def test_introduction_and_welcome(fake_bus: Any) -> None:
    async with _connect(
        fake_bus, capabilities=["code"], metadata={"team": "a"}, subscriptions=["a.*"]
    ) as agent:
        intro = fake_bus.last.introduce
        assert intro.agent_id == "me"
        assert list(intro.capabilities) == ["code"]
        assert intro.metadata.fields["team"].string_value == "a"
        assert list(intro.subscriptions) == ["a.*"]
        assert agent.session_id == fake_bus.last.session_id
        assert agent.server_id == "fake"
        assert agent.max_payload_bytes == 1000
        assert agent.subscriptions == frozenset({"a.*"})


async def test_refused_introduction_raises_the_mapped_error(fake_bus: Any) -> None:
    fake_bus.refusal = agentpost.InvalidAgentIdError("agent_id 'bad id' is not valid")
    with pytest.raises(agentpost.InvalidAgentIdError, match="not valid"):
        await _connect(fake_bus, agent_id="bad id")


async def test_unreachable_server_raises_connection_lost_after_the_timeout() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = agentpost.ConnectOptions(connect_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(agentpost.ConnectionLostError, match=r"within 0\.3s"):
        await agentpost.connect(f"127.0.0.1:{port}", agent_id="me", options=options)
    assert time.monotonic() - started < 5


async def test_concurrent_operations_share_frames(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent:
        ids = await asyncio.gather(*(agent.send("peer", {"i": i}) for i in range(200)))
        assert len(set(ids)) == 200
        session = fake_bus.last
        assert len(session.of_kind("send")) == 200
        assert max(session.frames) > 1, session.frames
        sent = [
            op.send.payload.json.struct_value.fields["i"].number_value for op in session.operations
        ]
        assert sent == list(range(200))  # in order


async def test_operation_errors_are_mapped(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent:
        with pytest.raises(agentpost.NoResponderError, match="no one there"):
            await agent.request("nobody", 1, timeout=2)
        with pytest.raises(agentpost.HandlerError, match="KeyError"):
            await agent.request("failing", 1, timeout=2)
        reply = await agent.request("echo", {"q": [1, 2]}, headers={"h": "1"}, timeout=2)
        assert reply.kind is agentpost.MessageKind.REPLY
        assert reply.payload == {"q": [1, 2]}
        sent = fake_bus.last.of_kind("request")[-1].request
        assert sent.headers["h"] == "1"
        assert sent.timeout.ToNanoseconds() == 2_000_000_000


async def test_oversized_payloads_are_refused_before_sending(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent:
        with pytest.raises(agentpost.PayloadTooLargeError) as caught:
            await agent.send("peer", "x" * 2000)
        assert caught.value.metadata["limit_bytes"] == "1000"
        with pytest.raises(agentpost.InvalidArgumentError):
            await agent.send("peer", {"bad": {1, 2}})
        assert fake_bus.last.of_kind("send") == []


async def test_a_request_cannot_hang(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent:
        started = time.monotonic()
        with pytest.raises(agentpost.RequestTimeoutError, match="no reply within"):
            await agent.request("silent", 1, timeout=0.1)
        assert time.monotonic() - started < 3


async def test_keep_alives_are_answered(fake_bus: Any) -> None:
    async with _connect(fake_bus):
        fake_bus.last.push(messaging_pb2.ServerEvent(keep_alive=messaging_pb2.KeepAlive()))
        await assert_eventually(lambda: bool(fake_bus.last.of_kind("keep_alive")))


async def test_idle_sessions_send_keep_alives_on_their_own(fake_bus: Any) -> None:
    fake_bus.keepalive_seconds = 0.2
    async with _connect(fake_bus):
        await assert_eventually(lambda: len(fake_bus.last.of_kind("keep_alive")) >= 2)


async def test_deliveries_reach_messages_with_backpressure(
    fake_bus: Any, make_envelope: Any
) -> None:
    options = agentpost.ConnectOptions(connect_timeout=3, max_buffered_messages=2)
    async with _connect(fake_bus, options=options) as agent:
        for i in range(20):
            fake_bus.last.deliver(make_envelope(payload={"i": i}, id=f"m{i}"))
        received = []
        async for message in agent.messages():
            received.append(message.payload["i"])
            if len(received) == 20:
                break
        assert received == list(range(20))


async def test_requests_without_a_handler_arrive_in_messages(
    fake_bus: Any, make_envelope: Any
) -> None:
    async with _connect(fake_bus) as agent:
        fake_bus.last.deliver(make_envelope(REQUEST, payload={"q": 1}, id="r1"))
        request = await anext(agent.messages())
        assert request.is_request
        await request.reply({"a": 2}, headers={"k": "v"})  # queued: the server does not answer
        await assert_eventually(lambda: bool(fake_bus.last.of_kind("reply")))
        reply = fake_bus.last.of_kind("reply")[0].reply
        assert reply.correlation_id == "r1"
        assert reply.payload.json.struct_value.fields["a"].number_value == 2
        assert reply.headers["k"] == "v"


async def test_handlers_answer_requests(fake_bus: Any, make_envelope: Any) -> None:
    async with _connect(fake_bus) as agent:

        @agent.on_request
        async def handle(message: agentpost.Message) -> Any:
            if message.payload == "boom":
                raise ValueError("bad input")
            return {"answer": message.payload * 2}

        fake_bus.last.deliver(make_envelope(REQUEST, payload=21, id="r1"))
        fake_bus.last.deliver(make_envelope(REQUEST, payload="boom", id="r2"))
        await assert_eventually(lambda: len(fake_bus.last.of_kind("reply")) == 2)
        replies = {op.reply.correlation_id: op.reply for op in fake_bus.last.of_kind("reply")}
        assert replies["r1"].payload.json.struct_value.fields["answer"].number_value == 42
        assert not replies["r1"].HasField("error")
        error = replies["r2"].error
        assert error.reason == errors_pb2.ERROR_REASON_HANDLER_FAILED
        assert error.code == 2
        assert error.message == "ValueError: bad input"
        assert not replies["r2"].HasField("payload")


def _waiting_operations(agent: agentpost.Agent) -> dict[str, Any]:
    link = agent._session._link
    assert link is not None
    return {**link.accepts, **link.replies}


@pytest.mark.parametrize("legacy", [False, True], ids=["reply-only", "older-server"])
async def test_requests_and_replies_leave_nothing_waiting(
    fake_bus: Any, make_envelope: Any, legacy: bool, caplog: pytest.LogCaptureFixture
) -> None:
    fake_bus.legacy_accepts = legacy  # an older server also answers both with `accepted`
    async with _connect(fake_bus) as agent:

        @agent.on_request
        async def handle(message: agentpost.Message) -> Any:
            return message.payload

        for i in range(3):
            fake_bus.last.deliver(make_envelope(REQUEST, payload=i, id=f"r{i}"))
            assert (await agent.request("echo", i, timeout=2)).payload == i
        await assert_eventually(lambda: len(fake_bus.last.of_kind("reply")) == 3)
        assert await agent.send("peer", "last")  # every answer sent so far has been read
        assert _waiting_operations(agent) == {}
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_refused_reply_is_logged_not_raised(
    fake_bus: Any, make_envelope: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fake_bus.refuse_replies = agentpost.UnknownRequestError("request r1 is not waiting")
    async with _connect(fake_bus) as agent:

        @agent.on_request
        async def handle(message: agentpost.Message) -> Any:
            return "late"

        fake_bus.last.deliver(make_envelope(REQUEST, payload=1, id="r1"))
        await assert_eventually(
            lambda: any("reply to request r1" in r.getMessage() for r in caplog.records)
        )
        record = next(r for r in caplog.records if "reply to request r1" in r.getMessage())
        assert record.levelno == logging.WARNING
        assert "is not waiting" in record.getMessage()

        agent.handle_requests(None)
        fake_bus.last.deliver(make_envelope(REQUEST, payload=2, id="r2"))
        request = await anext(agent.messages())
        await request.reply("late too")  # returns once queued; the refusal is only logged
        await assert_eventually(
            lambda: any("reply to request r2" in r.getMessage() for r in caplog.records)
        )
        assert _waiting_operations(agent) == {}
        assert await agent.send("peer", "still fine")


async def test_a_reply_to_a_request_whose_stream_is_gone_raises(
    fake_bus: Any, make_envelope: Any
) -> None:
    async with _connect(fake_bus) as agent:
        first = fake_bus.last
        first.deliver(make_envelope(REQUEST, payload=1, id="r1"))
        request = await anext(agent.messages())
        first.end()
        await assert_eventually(lambda: len(fake_bus.sessions) == 2)
        with pytest.raises(agentpost.ConnectionLostError, match="gone"):
            await request.reply(1)
        assert fake_bus.last.of_kind("reply") == []


async def test_lost_stream_fails_in_flight_operations_then_reconnects_and_resubscribes(
    fake_bus: Any,
) -> None:
    async with _connect(fake_bus, subscriptions=["a.*"]) as agent:
        await agent.subscribe("b.>", "c.x")
        await agent.unsubscribe("c.x")
        first = fake_bus.last
        pending = asyncio.create_task(agent.request("silent", 1, timeout=30))
        await assert_eventually(lambda: bool(first.of_kind("request")))
        first.end()
        with pytest.raises(agentpost.ConnectionLostError):
            await pending
        await assert_eventually(lambda: len(fake_bus.sessions) == 2)
        assert sorted(fake_bus.last.introduce.subscriptions) == ["a.*", "b.>"]
        assert await agent.send("peer", "after")  # the new stream takes operations
        assert agent.session_id == fake_bus.last.session_id != first.session_id


async def test_going_away_moves_to_a_new_stream(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent:
        first = fake_bus.last
        first.push(messaging_pb2.ServerEvent(going_away=messaging_pb2.GoingAway(reason="bye")))
        await assert_eventually(lambda: len(fake_bus.sessions) == 2)
        assert await agent.send("peer", 1)
        assert fake_bus.last.of_kind("send")
        first.end()


async def test_subscriptions_applied_by_a_departing_stream_reach_the_new_one(fake_bus: Any) -> None:
    async with _connect(fake_bus, subscriptions=["a.*"]) as agent:
        first = fake_bus.last
        fake_bus.hold_subscribes = True
        subscribing = asyncio.create_task(agent.subscribe("b.*"))
        await assert_eventually(lambda: bool(fake_bus.held))
        fake_bus.gate = asyncio.Event()
        first.push(messaging_pb2.ServerEvent(going_away=messaging_pb2.GoingAway(reason="bye")))
        await assert_eventually(lambda: fake_bus.attempts == 2)  # introduced without b.*
        fake_bus.hold_subscribes = False
        fake_bus.release()  # the departing stream applies b.* after all
        await subscribing
        fake_bus.gate.set()
        await assert_eventually(lambda: len(fake_bus.sessions) == 2)
        second = fake_bus.last
        assert list(second.introduce.subscriptions) == ["a.*"]
        await assert_eventually(lambda: bool(second.of_kind("subscribe")))
        assert list(second.of_kind("subscribe")[0].subscribe.patterns) == ["b.*"]
        assert agent.subscriptions == frozenset({"a.*", "b.*"})


async def test_operations_wait_for_the_reconnection(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent:
        fake_bus.gate = asyncio.Event()
        fake_bus.last.end()
        await assert_eventually(lambda: fake_bus.attempts == 2)  # reconnecting, not welcomed yet
        sending = asyncio.create_task(agent.send("peer", "soon"))
        await asyncio.sleep(0.1)
        assert not sending.done()
        fake_bus.gate.set()
        assert await sending
        assert len(fake_bus.sessions) == 2
        assert fake_bus.last.of_kind("send")


async def test_operations_give_up_after_connect_timeout(fake_bus: Any) -> None:
    options = agentpost.ConnectOptions(connect_timeout=0.3, reconnect_initial_backoff=0.01)
    async with _connect(fake_bus, options=options) as agent:
        fake_bus.gate = asyncio.Event()
        fake_bus.last.end()
        await assert_eventually(lambda: fake_bus.attempts == 2)
        with pytest.raises(agentpost.ConnectionLostError, match="not reconnected within"):
            await agent.send("peer", "never")
        fake_bus.gate.set()


async def test_close_is_idempotent_and_ends_messages(fake_bus: Any) -> None:
    agent = await _connect(fake_bus)
    reader = asyncio.create_task(anext(agent.messages(), "ended"))
    await asyncio.sleep(0.05)
    await agent.close()
    await agent.close()
    assert await reader == "ended"
    with pytest.raises(agentpost.ConnectionLostError, match="closed"):
        await agent.send("peer", 1)
    assert [m async for m in agent.messages()] == []


async def test_unary_client(fake_bus: Any) -> None:
    async with agentpost.Client(fake_bus.target, agent_id="script") as client:
        assert await client.send("coder", {"x": 1}) == "script:coder"
        fake_bus.unary_error = agentpost.AgentOfflineError("agent 'coder' is not connected")
        with pytest.raises(agentpost.AgentOfflineError, match="not connected"):
            await client.send("coder", 1)
    async with agentpost.Client(fake_bus.target) as anonymous:
        fake_bus.unary_error = None
        assert await anonymous.send("coder", 1) == "anonymous:coder"
