"""Durable delivery in the SDK against the scriptable fake server (see conftest.py): batched
acknowledgements, the three ack modes, duplicates, the instance id across reconnects and
restarts (state_path), and sends that are repeated with the same idempotency key."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import agentpost
from agentpost import _ledger
from agentpost.v1 import messaging_pb2
from tests.client.conftest import delivery, envelope
from tests.helpers import assert_eventually

FAST = agentpost.ConnectOptions(
    connect_timeout=3.0, reconnect_initial_backoff=0.01, reconnect_max_backoff=0.05
)
KEEP_ALIVE = messaging_pb2.ServerEvent(keep_alive=messaging_pb2.KeepAlive())


def _connect(bus: Any, **options: Any) -> agentpost.AgentConnector:
    settings = {
        "connect_timeout": 3.0,
        "reconnect_initial_backoff": 0.01,
        "reconnect_max_backoff": 0.05,
        **options,
    }
    return agentpost.connect(
        bus.target, agent_id="me", options=agentpost.ConnectOptions(**settings)
    )


async def _crash_while_handling(bus: Any, **options: Any) -> None:
    """An agent whose loop body raises out of its `async with` block, on message m1 (d1)."""
    async with _connect(bus, **options) as agent:
        bus.last.deliver(envelope(id="m1"), "d1")
        async for _message in agent.messages():
            raise RuntimeError("handler crashed")


def _leftovers(directory: Path) -> list[Path]:
    return list(directory.glob("*.tmp"))


async def _barrier(session: Any) -> None:
    """Until the client has answered a keep-alive: every ack due before it went out with it."""
    before = len(session.of_kind("keep_alive"))
    session.push(KEEP_ALIVE)
    await assert_eventually(lambda: len(session.of_kind("keep_alive")) > before)


# ----------------------------------------------------------------------------- batching


async def test_acks_are_batched_into_one_operation_per_frame(fake_bus: Any) -> None:
    async with _connect(fake_bus, ack_mode="on_receipt") as agent:
        server = fake_bus.last
        server.push(*(delivery(envelope(id=f"m{i}"), f"d{i}") for i in range(50)))
        messages = agent.messages()
        received = [(await anext(messages)).id for _ in range(50)]
        assert received == [f"m{i}" for i in range(50)]
        await assert_eventually(lambda: len(server.acked()) == 50)
        assert server.acked() == [f"d{i}" for i in range(50)]
        assert len(server.of_kind("ack")) == 1  # one Acknowledge for the whole frame


async def test_manual_acks_made_together_share_one_operation(fake_bus: Any) -> None:
    async with _connect(fake_bus, ack_mode="manual") as agent:
        server = fake_bus.last
        server.push(*(delivery(envelope(id=f"m{i}"), f"d{i}") for i in range(20)))
        messages = agent.messages()
        held = [await anext(messages) for _ in range(20)]
        await _barrier(server)
        assert server.acked() == []  # manual: nothing until asked
        for message in held:
            await message.ack()
            await message.ack()  # idempotent
        await assert_eventually(lambda: len(server.acked()) == 20)
        assert len(server.of_kind("ack")) == 1
        assert held[0].delivery_id == "d0"


# ----------------------------------------------------------------------------- ack modes


async def test_after_handling_acks_once_the_loop_asks_for_the_next_message(
    fake_bus: Any,
) -> None:
    async with _connect(fake_bus) as agent:
        server = fake_bus.last
        server.deliver(envelope(id="m1"), "d1")
        server.deliver(envelope(id="m2"), "d2")
        seen = []
        async for message in agent.messages():
            seen.append(message.id)
            await _barrier(server)
            if message.id == "m1":
                assert server.acked() == []  # the loop body is running: not yet
            else:
                assert server.acked() == ["d1"]  # acked when m2 was asked for
                break
        await assert_eventually(lambda: server.acked() == ["d1", "d2"])  # left the loop
        assert seen == ["m1", "m2"]


async def test_messages_without_a_delivery_id_are_never_acked(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent:
        server = fake_bus.last
        server.deliver(envelope(id="live", topic="t"))
        message = await anext(agent.messages())
        assert (message.id, message.delivery_id) == ("live", "")
        await message.ack()  # a no-op
        await _barrier(server)
        assert server.of_kind("ack") == []


async def test_leaving_the_block_normally_acks_what_the_loop_held(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent:
        server = fake_bus.last
        server.deliver(envelope(id="m1"), "d1")
        async for _message in agent.messages():
            break
    # The goodbye carried the ack before the stream ended (the README quickstart's pattern).
    assert server.half_closed
    assert server.acked() == ["d1"]


async def test_an_exception_out_of_the_block_leaves_the_message_unacked(fake_bus: Any) -> None:
    with pytest.raises(RuntimeError, match="handler crashed"):
        await _crash_while_handling(fake_bus)
    server = fake_bus.last
    assert server.half_closed
    assert server.acked() == []


async def test_a_cancelled_handler_is_not_acked_and_sees_the_message_again(
    fake_bus: Any,
) -> None:
    async with _connect(fake_bus) as agent:
        server = fake_bus.last
        server.deliver(envelope(id="m1"), "d1")
        started = asyncio.Event()

        async def consume() -> None:
            async for _message in agent.messages():
                started.set()
                await asyncio.Event().wait()  # handling takes forever

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.deliver(envelope(id="m1"), "d1-again", redeliveries=1)
        messages = agent.messages()
        again = await anext(messages)
        assert (again.id, again.delivery_id, again.redeliveries) == ("m1", "d1-again", 1)
        await _barrier(server)
        assert server.acked() == []  # neither the cancelled delivery nor the one being handled


async def test_ack_after_close_raises_and_the_message_comes_again(fake_bus: Any) -> None:
    async with _connect(fake_bus, ack_mode="manual") as agent:
        fake_bus.last.deliver(envelope(id="m1"), "d1")
        message = await anext(agent.messages())
    with pytest.raises(agentpost.ConnectionLostError, match="delivered again"):
        await message.ack()


async def test_acks_go_out_while_the_reader_waits_for_room(fake_bus: Any) -> None:
    async with _connect(fake_bus, ack_mode="manual", max_buffered_messages=2) as agent:
        server = fake_bus.last
        for i in range(5):
            server.deliver(envelope(id=f"m{i}"), f"d{i}")
        messages = agent.messages()
        first = await anext(messages)  # the reader refills the buffer and waits again
        await first.ack()
        await assert_eventually(lambda: server.acked() == ["d0"])
        rest = [await anext(messages) for _ in range(4)]
        assert [m.id for m in rest] == ["m1", "m2", "m3", "m4"]


# ----------------------------------------------------------------------------- duplicates


async def test_a_redelivered_handled_message_is_dropped_and_acked_at_once(
    fake_bus: Any,
) -> None:
    async with _connect(fake_bus) as agent:
        server = fake_bus.last
        server.deliver(envelope(id="m1"), "d1")
        messages = agent.messages()
        assert (await anext(messages)).id == "m1"
        server.deliver(envelope(id="m1"), "d1-again", redeliveries=1)
        server.deliver(envelope(id="m2"), "d2")
        second = await anext(messages)  # acks m1
        assert second.id == "m2"
        await assert_eventually(lambda: server.acked() == ["d1", "d1-again"])
        await _barrier(server)
        assert server.acked() == ["d1", "d1-again"]  # m2's loop body still runs


async def test_a_message_redelivered_while_held_is_shown_once_and_acked_twice(
    fake_bus: Any,
) -> None:
    async with _connect(fake_bus) as agent:
        first_stream = fake_bus.last
        first_stream.deliver(envelope(id="m1"), "d1")
        messages = agent.messages()
        assert (await anext(messages)).id == "m1"
        first_stream.end()  # lost while the application handles m1
        await assert_eventually(lambda: len(fake_bus.sessions) == 2)
        second_stream = fake_bus.last
        second_stream.deliver(envelope(id="m1"), "d1", redeliveries=1)  # taken over
        second_stream.deliver(envelope(id="m2"), "d2")
        assert (await anext(messages)).id == "m2"  # m1 is not shown again
        await assert_eventually(lambda: second_stream.acked() == ["d1", "d1"])


async def test_a_live_and_a_durable_copy_of_one_message_are_shown_once(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent:
        server = fake_bus.last
        server.push(
            delivery(envelope(id="m1", topic="t")),
            delivery(envelope(id="m1", topic="t"), "d1"),
            delivery(envelope(id="m2")),
        )
        messages = agent.messages()
        assert [(await anext(messages)).id for _ in range(2)] == ["m1", "m2"]
        await assert_eventually(lambda: server.acked() == ["d1"])


def test_the_ledger_forgets_the_oldest_ids_first() -> None:
    ledger = _ledger.Ledger(3, keep=2)
    for i in range(4):
        assert ledger.admit(f"m{i}", f"d{i}")
        assert ledger.ack(f"m{i}")
    assert not ledger.ack("m3")  # once
    assert ledger.take_pending() == ["d0", "d1", "d2", "d3"]
    assert ledger.admit("m0", "again")  # forgotten: shown again
    assert not ledger.admit("m3", "again")
    assert ledger.take_pending() == ["again"]
    assert ledger.recent_acked() == ["m2", "m3"]


# ----------------------------------------------------------------------------- instances


async def test_the_instance_id_is_kept_across_reconnects(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent, _connect(fake_bus) as replica:
        assert agent.instance_id != replica.instance_id  # replicas compete
        first = next(s for s in fake_bus.sessions if s.session_id == agent.session_id)
        assert first.introduce.instance_id == agent.instance_id
        first.end()
        await assert_eventually(lambda: len(fake_bus.sessions) == 3)
        assert fake_bus.last.introduce.instance_id == agent.instance_id
        assert agent.session_id == fake_bus.last.session_id


async def test_instance_id_and_window_are_introduced_as_configured(fake_bus: Any) -> None:
    async with _connect(fake_bus, instance_id="coder-1", max_unacked=7) as agent:
        introduce = fake_bus.last.introduce
        assert (introduce.instance_id, introduce.max_unacked) == ("coder-1", 7)
        assert (agent.instance_id, agent.max_unacked) == ("coder-1", 7)
    async with _connect(fake_bus) as agent:
        assert fake_bus.last.introduce.max_unacked == 0  # the server's default...
        assert agent.max_unacked == 100  # ...as the Welcome announces it


def test_ack_options_are_checked() -> None:
    with pytest.raises(ValueError, match="ack_mode"):
        agentpost.ConnectOptions(ack_mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_unacked"):
        agentpost.ConnectOptions(max_unacked=11, max_buffered_messages=10)
    with pytest.raises(ValueError, match="instance_id"):
        agentpost.ConnectOptions(instance_id="")


# ----------------------------------------------------------------------------- state_path


async def test_a_restarted_agent_resumes_from_its_state_file(fake_bus: Any, tmp_path: Path) -> None:
    state = tmp_path / "state" / "me.json"
    async with _connect(fake_bus, state_path=state) as agent:
        instance_id = agent.instance_id
        assert json.loads(state.read_text())["instance_id"] == instance_id  # kept at once
        fake_bus.last.deliver(envelope(id="m1"), "d1")
        async for _message in agent.messages():
            break
    assert json.loads(state.read_text())["handled"] == ["m1"]

    async with _connect(fake_bus, state_path=state) as restarted:
        assert restarted.instance_id == instance_id
        assert fake_bus.last.introduce.instance_id == instance_id
        fake_bus.last.deliver(envelope(id="m1"), "d1", redeliveries=1)  # the ack was lost
        fake_bus.last.deliver(envelope(id="m2"), "d2")
        assert (await anext(restarted.messages())).id == "m2"
        await assert_eventually(lambda: "d1" in fake_bus.last.acked())


async def test_a_message_whose_handler_crashed_is_shown_after_a_restart(
    fake_bus: Any, tmp_path: Path
) -> None:
    state = tmp_path / "me.json"
    with pytest.raises(RuntimeError):
        await _crash_while_handling(fake_bus, state_path=state)
    async with _connect(fake_bus, state_path=state) as restarted:
        fake_bus.last.deliver(envelope(id="m1"), "d1", redeliveries=1)
        again = await anext(restarted.messages())
        assert (again.id, again.redeliveries) == ("m1", 1)


async def test_the_state_file_is_written_while_acks_happen(fake_bus: Any, tmp_path: Path) -> None:
    state = tmp_path / "me.json"
    async with _connect(fake_bus, state_path=state, ack_mode="manual") as agent:
        fake_bus.last.deliver(envelope(id="m1"), "d1")
        message = await anext(agent.messages())
        await message.ack()
        await assert_eventually(lambda: json.loads(state.read_text())["handled"] == ["m1"])
        assert _leftovers(tmp_path) == []


async def test_a_state_file_serves_one_agent_at_a_time(fake_bus: Any, tmp_path: Path) -> None:
    state = tmp_path / "me.json"
    async with _connect(fake_bus, state_path=state):
        with pytest.raises(agentpost.InvalidArgumentError, match="in use"):
            await _connect(fake_bus, state_path=state)
    other = agentpost.connect(
        fake_bus.target,
        agent_id="someone-else",
        options=agentpost.ConnectOptions(state_path=state),
    )
    with pytest.raises(agentpost.InvalidArgumentError, match="belongs to agent 'me'"):
        await other
    state.write_text("{not json")
    with pytest.raises(agentpost.InvalidArgumentError, match="not JSON"):
        await _connect(fake_bus, state_path=state)


# ----------------------------------------------------------------------------- sends


async def test_a_send_is_repeated_with_the_same_key_after_a_lost_stream(
    fake_bus: Any,
) -> None:
    async with _connect(fake_bus) as agent:
        fake_bus.drop_sends = 1  # stored, then the stream ends before the answer
        message_id = await agent.send("peer", {"x": 1})
        assert len(fake_bus.sessions) == 2
        keys = [s.of_kind("send")[0].send.idempotency_key for s in fake_bus.sessions]
        assert keys[0] and keys[0] == keys[1]
        assert fake_bus.stored == {keys[0]: message_id}  # stored once, its id returned

        await agent.send("peer", 2, idempotency_key="k-1", ttl=1.5)
        sent = fake_bus.last.of_kind("send")[-1].send
        assert (sent.idempotency_key, sent.ttl.ToNanoseconds()) == ("k-1", 1_500_000_000)
        with pytest.raises(agentpost.InvalidArgumentError, match="ttl"):
            await agent.send("peer", 3, ttl=0)


async def test_sends_without_a_key_get_short_lived_retry_keys(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent:
        for i in range(3):
            await agent.send("peer", i)
        keys = [op.send.idempotency_key for op in fake_bus.last.of_kind("send")]
    assert len(set(keys)) == 3
    assert all(key.startswith("~") and len(key) <= 32 for key in keys), keys
    async with _connect(fake_bus) as other:  # another process of the same agent
        await other.send("peer", 3)
    assert fake_bus.last.of_kind("send")[0].send.idempotency_key not in keys

    async with agentpost.Client(fake_bus.target, agent_id="script") as client:
        await client.send("coder", 1)
        await client.send("coder", 2)
    unary_keys = [request.idempotency_key for request in fake_bus.unary_sends]
    assert len(set(unary_keys)) == 2 and all(key.startswith("~") for key in unary_keys)


@pytest.mark.parametrize("key", ["~mine", ""])
async def test_caller_keys_must_not_look_like_retry_keys(fake_bus: Any, key: str) -> None:
    async with _connect(fake_bus) as agent:
        with pytest.raises(agentpost.InvalidArgumentError, match="idempotency_key") as caught:
            await agent.send("peer", 1, idempotency_key=key)
        assert caught.value.metadata["field"] == "idempotency_key"
        assert fake_bus.last.of_kind("send") == []
    async with agentpost.Client(fake_bus.target) as client:
        with pytest.raises(agentpost.InvalidArgumentError, match="idempotency_key"):
            await client.send("coder", 1, idempotency_key=key)
    assert fake_bus.unary_sends == []


async def test_a_send_that_cannot_be_repeated_in_time_names_its_key(fake_bus: Any) -> None:
    async with _connect(fake_bus, connect_timeout=0.3) as agent:
        fake_bus.gate = asyncio.Event()  # the next stream is never welcomed
        fake_bus.drop_sends = 1
        with pytest.raises(agentpost.ConnectionLostError) as caught:
            await agent.send("peer", 1, idempotency_key="k-2")
        assert caught.value.metadata["idempotency_key"] == "k-2"
        fake_bus.gate.set()


async def test_the_unary_send_is_repeated_with_the_same_key(fake_bus: Any) -> None:
    options = agentpost.ConnectOptions(request_timeout=5, reconnect_initial_backoff=0.01)
    async with agentpost.Client(fake_bus.target, agent_id="script", options=options) as client:
        fake_bus.unavailable_sends = 2
        assert await client.send("coder", 1, ttl=60) == "script:coder"
        keys = {request.idempotency_key for request in fake_bus.unary_sends}
        assert len(fake_bus.unary_sends) == 3 and len(keys) == 1 and "" not in keys
        assert fake_bus.unary_sends[0].ttl.seconds == 60

    short = agentpost.ConnectOptions(request_timeout=0.3, reconnect_initial_backoff=0.01)
    async with agentpost.Client(fake_bus.target, options=short) as client:
        fake_bus.unavailable_sends = 1_000
        with pytest.raises(agentpost.ConnectionLostError) as caught:
            await client.send("coder", 1, idempotency_key="k-3")
        assert caught.value.metadata["idempotency_key"] == "k-3"
        with pytest.raises(agentpost.ConnectionLostError) as caught:
            await client.send("coder", 1)  # the SDK's key: no use for a retry later
        assert "idempotency_key" not in caught.value.metadata
        fake_bus.unavailable_sends = 0
        fake_bus.unary_error = agentpost.AgentNotFoundError("no agent 'ghost'")
        before = len(fake_bus.unary_sends)
        with pytest.raises(agentpost.AgentNotFoundError):
            await client.send("ghost", 1)
        assert len(fake_bus.unary_sends) == before + 1  # not repeated


# ----------------------------------------------------------------------------- subscriptions


async def test_durable_subscriptions_are_named_and_left_to_the_server(fake_bus: Any) -> None:
    async with _connect(fake_bus) as agent:
        await agent.subscribe("jobs.>", durable="jobs")
        await agent.subscribe("live.*")
        subscribe = fake_bus.last.of_kind("subscribe")[0].subscribe
        assert (list(subscribe.patterns), subscribe.durable_name) == (["jobs.>"], "jobs")
        assert agent.subscriptions == frozenset({"live.*"})
        fake_bus.last.end()
        await assert_eventually(lambda: len(fake_bus.sessions) == 2)
        assert list(fake_bus.last.introduce.subscriptions) == ["live.*"]  # the server resumes
        await agent.unsubscribe(durable="jobs")
        unsubscribe = fake_bus.last.of_kind("unsubscribe")[0].unsubscribe
        assert (list(unsubscribe.patterns), unsubscribe.durable_name) == ([], "jobs")
        with pytest.raises(agentpost.InvalidArgumentError, match="needs patterns"):
            await agent.subscribe(durable="jobs")
        with pytest.raises(agentpost.InvalidArgumentError, match="durable"):
            await agent.subscribe("x", durable="")


# ----------------------------------------------------------------------------- unary calls


async def test_register_mailbox_and_dead_letters(fake_bus: Any) -> None:
    async with agentpost.Client(fake_bus.target) as client:
        info = await client.register_agent("coder", capabilities=["code"], metadata={"v": 1})
        assert (info.agent_id, info.capabilities, info.metadata) == ("coder", ("code",), {"v": 1})
        assert (info.online, info.pending) == (False, 0)

        mailbox = await client.get_mailbox("coder")
        assert (mailbox.depth, mailbox.unacknowledged, mailbox.dead_lettered) == (3, 1, 2)
        assert mailbox.oldest_at is not None and mailbox.oldest_at.year == 2023
        assert (await client.get_mailbox("empty")).oldest_at is None

        letters = await client.list_dead_letters("coder", limit=5)
        assert [(d.message.id, d.message.payload, d.reason) for d in letters] == [
            ("d-1", {"late": True}, "ttl expired")
        ]
        assert letters[0].dead_at is not None
        request = fake_bus.unary_requests[-1]
        assert (request.agent_id, request.limit) == ("coder", 5)
        with pytest.raises(agentpost.InvalidArgumentError, match="limit"):
            await client.list_dead_letters(limit=0)
        with pytest.raises(agentpost.InvalidArgumentError, match="capabilities"):
            await client.register_agent("coder", capabilities="code")
