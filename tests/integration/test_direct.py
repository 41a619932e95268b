"""Direct messages: delivered to the named agent, in order, once; replicas share the load."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

import agentpost
from tests.helpers import assert_eventually


async def test_direct_message_carries_payload_headers_and_a_stamped_sender(make_agent, inbox):
    alice = await make_agent("alice")
    bob = await make_agent("bob")
    box = inbox(bob)
    payload = {"task": "review", "n": 3, "ratio": 0.5, "tags": ["a", None, True], "deep": {"x": {}}}
    message_id = await alice.send("bob", payload, headers={"trace": "t-1"})
    await assert_eventually(lambda: len(box.messages) == 1)
    received = box.messages[0]
    assert received.id == message_id and len(message_id) == 26
    assert received.sender == "alice"
    assert received.to == "bob"
    assert received.kind == agentpost.MessageKind.MESSAGE
    assert received.payload == payload
    assert received.headers == {"trace": "t-1"}
    assert received.created_at.tzinfo is not None


async def test_bytes_round_trip_with_their_content_type(make_agent, inbox):
    alice = await make_agent("alice")
    box = inbox(await make_agent("bob"))
    blob = bytes(range(256))
    await alice.send("bob", blob, content_type="application/x-test")
    await assert_eventually(lambda: len(box.messages) == 1)
    assert box.messages[0].payload == blob
    assert box.messages[0].content_type == "application/x-test"


async def test_messages_from_one_sender_arrive_in_order(make_agent, inbox):
    alice = await make_agent("alice")
    box = inbox(await make_agent("bob"))
    await asyncio.gather(*(alice.send("bob", i) for i in range(1000)))
    await assert_eventually(lambda: len(box.messages) == 1000, timeout=20)
    assert box.payloads() == list(range(1000))


async def test_send_to_an_unknown_agent_fails_at_once(make_agent):
    alice = await make_agent("alice")
    with pytest.raises(agentpost.AgentNotFoundError, match="nobody"):
        await alice.send("nobody", "hello?")
    with pytest.raises(agentpost.InvalidAgentIdError):
        await alice.send("not valid!", "hello?")


async def test_each_direct_message_reaches_exactly_one_replica(make_agent, inbox):
    replicas = [inbox(await make_agent("worker")) for _ in range(3)]
    senders = [await make_agent(f"sender-{i}") for i in range(12)]
    await asyncio.gather(
        *(s.send("worker", f"{s.agent_id}:{n}") for s in senders for n in range(20))
    )
    total = lambda: sum(len(r.messages) for r in replicas)
    await assert_eventually(lambda: total() == 240, timeout=10)
    seen = Counter(m.payload for r in replicas for m in r.messages)
    assert len(seen) == 240 and set(seen.values()) == {1}
    for replica in replicas:  # each sender's messages stay in order on each replica
        by_sender: dict[str, list[int]] = {}
        for m in replica.messages:
            sender, n = m.payload.split(":")
            by_sender.setdefault(sender, []).append(int(n))
        assert all(ns == sorted(ns) for ns in by_sender.values())
