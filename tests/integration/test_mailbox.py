"""Durable mailboxes at the wire level: held while away, delivered in order with delivery ids,
acknowledged once, redelivered to the same instance, bounded by the window, expired to the dead
letters, idempotent sends."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis.asyncio

from agentpost.v1 import envelope_pb2, messaging_pb2, messaging_pb2_grpc, payload_pb2
from tests.helpers import assert_eventually
from tests.integration.raw import RawAgent


@pytest.fixture
async def stub(target: str):
    async with grpc.aio.insecure_channel(target) as channel:
        yield messaging_pb2_grpc.AgentMessagingStub(channel)


def text(n: int | str) -> payload_pb2.Payload:
    return payload_pb2.Payload(json={"string_value": str(n)})


async def send(stub, to: str, n: int | str, **extra: object) -> str:
    reply = await stub.Send(messaging_pb2.SendRequest(to=to, payload=text(n), **extra))
    return reply.message_id


async def test_unknown_agents_are_refused_and_registered_ones_hold_messages(stub, target):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(stub, "typo", 1)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.RegisterAgent(
        messaging_pb2.RegisterAgentRequest(agent_id="later", capabilities=["x"])
    )
    ids = [await send(stub, "later", n) for n in range(5)]
    box = await stub.GetMailbox(messaging_pb2.GetMailboxRequest(agent_id="later"))
    assert box.depth == 5 and box.unacknowledged == 0 and box.HasField("oldest_at")
    async with RawAgent(target, "later") as agent:
        await assert_eventually(lambda: len(agent.deliveries()) == 5)
        assert [e.delivery.id for e in agent.deliveries()] == ids
        assert all(e.delivery_id.startswith("m:") for e in agent.deliveries())
        await agent.ack(*(e.delivery_id for e in agent.deliveries()))

        async def empty() -> bool:
            box = await stub.GetMailbox(messaging_pb2.GetMailboxRequest(agent_id="later"))
            return box.depth == 0

        await assert_eventually(empty)


async def test_unacknowledged_deliveries_come_again_to_the_same_instance_in_order(stub, target):
    await stub.RegisterAgent(messaging_pb2.RegisterAgentRequest(agent_id="resumer"))
    ids = [await send(stub, "resumer", n) for n in range(10)]
    async with RawAgent(target, "resumer", instance_id="inst-1") as first:
        await assert_eventually(lambda: len(first.deliveries()) == 10)
        await first.ack(*(e.delivery_id for e in first.deliveries()[:4]))

        async def acked() -> bool:  # acknowledged entries are deleted from the mailbox
            box = await stub.GetMailbox(messaging_pb2.GetMailboxRequest(agent_id="resumer"))
            return box.depth == 6

        await assert_eventually(acked)
    ids += [await send(stub, "resumer", n) for n in range(10, 13)]
    async with RawAgent(target, "resumer", instance_id="inst-1") as second:
        await assert_eventually(lambda: len(second.deliveries()) == 9)
        got = second.deliveries()
        assert [e.delivery.id for e in got] == ids[4:]
        assert [e.redeliveries > 0 for e in got] == [True] * 6 + [False] * 3


async def test_a_new_instance_adopts_what_a_departed_one_left(stub, target):
    await stub.RegisterAgent(messaging_pb2.RegisterAgentRequest(agent_id="worker"))
    ids = [await send(stub, "worker", n) for n in range(6)]
    async with RawAgent(target, "worker", instance_id="a") as first:
        await assert_eventually(lambda: len(first.deliveries()) == 6)
    async with RawAgent(target, "worker", instance_id="b") as second:
        await assert_eventually(lambda: len(second.deliveries()) == 6)
        assert [e.delivery.id for e in second.deliveries()] == ids


async def test_the_window_bounds_unacknowledged_deliveries(stub, target):
    await stub.RegisterAgent(messaging_pb2.RegisterAgentRequest(agent_id="slow"))
    for n in range(30):
        await send(stub, "slow", n)
    async with RawAgent(target, "slow", max_unacked=10) as agent:
        assert agent.welcome is not None and agent.welcome.max_unacked == 10
        await assert_eventually(lambda: len(agent.deliveries()) == 10)
        await asyncio.sleep(0.2)
        assert len(agent.deliveries()) == 10  # nothing beyond the window
        await agent.ack(*(e.delivery_id for e in agent.deliveries()))
        await assert_eventually(lambda: len(agent.deliveries()) == 20)


async def test_a_repeated_idempotency_key_stores_once(stub, target):
    await stub.RegisterAgent(messaging_pb2.RegisterAgentRequest(agent_id="once"))
    first = await send(stub, "once", "a", idempotency_key="k-1")
    again = await send(stub, "once", "a", idempotency_key="k-1")
    other = await send(stub, "once", "b", idempotency_key="k-2")
    assert first == again != other
    box = await stub.GetMailbox(messaging_pb2.GetMailboxRequest(agent_id="once"))
    assert box.depth == 2


async def test_expired_messages_go_to_the_dead_letters(stub, target):
    await stub.RegisterAgent(messaging_pb2.RegisterAgentRequest(agent_id="away"))
    expired = await send(stub, "away", "stale", ttl={"nanos": 100_000_000})
    kept = await send(stub, "away", "fresh")
    await asyncio.sleep(0.3)
    async with RawAgent(target, "away") as agent:
        await assert_eventually(lambda: len(agent.deliveries()) == 1)
        assert agent.deliveries()[0].delivery.id == kept
    letters = await stub.ListDeadLetters(messaging_pb2.ListDeadLettersRequest(agent_id="away"))
    assert [(d.envelope.id, d.reason) for d in letters.dead_letters] == [(expired, "ttl expired")]
    box = await stub.GetMailbox(messaging_pb2.GetMailboxRequest(agent_id="away"))
    assert box.dead_lettered == 1


async def test_a_full_mailbox_moves_its_oldest_to_the_dead_letters(start_server):
    app = await start_server(mailbox_max_messages=3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = messaging_pb2_grpc.AgentMessagingStub(channel)
        await stub.RegisterAgent(messaging_pb2.RegisterAgentRequest(agent_id="full"))
        ids = [await send(stub, "full", n) for n in range(5)]
        letters = await stub.ListDeadLetters(messaging_pb2.ListDeadLettersRequest(agent_id="full"))
        assert [d.envelope.id for d in letters.dead_letters] == [ids[1], ids[0]]
        assert {d.reason for d in letters.dead_letters} == {"mailbox full"}


async def test_broadcasts_missed_while_away_arrive_on_reconnect(stub, target):
    async with RawAgent(target, "napper"):
        pass
    for n in range(3):
        await stub.Publish(messaging_pb2.PublishRequest(broadcast={}, payload=text(n)))
    async with RawAgent(target, "napper") as agent:
        await assert_eventually(lambda: len(agent.deliveries()) == 3)
        assert [e.delivery.payload.json.string_value for e in agent.deliveries()] == ["0", "1", "2"]
        await agent.ack(*(e.delivery_id for e in agent.deliveries()))
        await asyncio.sleep(0.2)
    async with RawAgent(target, "napper") as agent:
        await asyncio.sleep(0.3)
        assert agent.deliveries() == []  # acknowledged: not again


async def test_durable_subscriptions_keep_their_position_while_away(stub, target):
    async with RawAgent(target, "reader") as agent:
        op = messaging_pb2.ClientOperation(operation_id="sub")
        op.subscribe.patterns.append("news.>")
        op.subscribe.durable_name = "news"
        await agent._outbox.put(op)
        await assert_eventually(lambda: any(e.operation_id == "sub" for e in agent.events))
        await stub.Publish(messaging_pb2.PublishRequest(topic="news.live", payload=text("live")))
        await assert_eventually(lambda: len(agent.deliveries()) == 1)
        live = agent.deliveries()[0]
        assert live.delivery_id.startswith("t:news:")
        await agent.ack(live.delivery_id)
        await asyncio.sleep(0.2)
    for n in range(3):  # while away: kept for the durable subscription
        await stub.Publish(messaging_pb2.PublishRequest(topic=f"news.n{n}", payload=text(n)))
    await stub.Publish(messaging_pb2.PublishRequest(topic="sports.x", payload=text("no")))
    async with RawAgent(target, "reader") as agent:  # resumed on connect, no resubscribe
        await assert_eventually(lambda: len(agent.deliveries()) == 3)
        assert [e.delivery.recipient.topic for e in agent.deliveries()] == [
            "news.n0",
            "news.n1",
            "news.n2",
        ]
        await stub.Publish(messaging_pb2.PublishRequest(topic="news.after", payload=text("a")))
        await assert_eventually(lambda: len(agent.deliveries()) == 4)
        await agent.ack(*(e.delivery_id for e in agent.deliveries()))
        op = messaging_pb2.ClientOperation(operation_id="unsub")
        op.unsubscribe.durable_name = "news"
        await agent._outbox.put(op)
        await assert_eventually(lambda: any(e.operation_id == "unsub" for e in agent.events))
    await stub.Publish(messaging_pb2.PublishRequest(topic="news.gone", payload=text("x")))
    async with RawAgent(target, "reader") as agent:
        await asyncio.sleep(0.3)
        assert agent.deliveries() == []


async def test_a_bus_reconnect_catches_up_on_broadcasts_missed_live(
    start_server, redis_url, key_prefix
):
    app = await start_server()
    missed = envelope_pb2.Envelope(id="01KZZZZZZZZZZZZZZZZZZZZZZZ", sender="elsewhere", kind=1)
    missed.recipient.broadcast.SetInParent()
    missed.payload.json.string_value = "published while this server's pub/sub was down"
    async with RawAgent(f"127.0.0.1:{app.port}", "listener") as agent:
        # In the log, but never fanned out live to this server (as if its pub/sub had dropped).
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            await client.xadd(f"{key_prefix}:broadcasts", {"e": missed.SerializeToString()})
        finally:
            await client.aclose()
        await asyncio.sleep(0.2)
        assert agent.deliveries() == []
        assert app.hub is not None
        app.hub.on_bus_reset()
        await assert_eventually(lambda: [e.delivery.id for e in agent.deliveries()] == [missed.id])
        assert agent.deliveries()[0].delivery_id.startswith("b:")
