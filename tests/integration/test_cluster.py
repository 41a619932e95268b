"""Several server processes on one Redis form one bus: every pattern works across them."""

from __future__ import annotations

import asyncio

import pytest

import agentpost
from tests.helpers import assert_eventually

pytestmark = pytest.mark.timeout(60)


async def test_agents_on_two_server_processes_exchange_every_kind_of_traffic(spawn, inbox):
    one, two = await spawn(), await spawn()
    async with (
        agentpost.connect(one.target, agent_id="alice", subscriptions=["jobs.*"]) as alice,
        agentpost.connect(two.target, agent_id="bob", subscriptions=["jobs.>"]) as bob,
    ):

        @bob.on_request
        async def answer(message: agentpost.Message) -> str:
            return f"bob heard {message.payload}"

        alice_box, bob_box = inbox(alice), inbox(bob)

        # direct, both ways
        await alice.send("bob", "hi bob")
        await bob.send("alice", "hi alice")
        # request/response across processes
        reply = await alice.request("bob", "ping", timeout=5)
        assert reply.payload == "bob heard ping" and reply.sender == "bob"
        # topics and broadcast
        await bob.publish("jobs.build", {"id": 7})
        await alice.publish("jobs.deploy", {"id": 8})
        await alice.broadcast("everyone")

        await assert_eventually(lambda: len(bob_box.messages) == 3)
        await assert_eventually(lambda: len(alice_box.messages) == 2)
        # (direct messages come from the mailbox, topics and broadcasts live: no order between)
        assert sorted(map(repr, (m.payload for m in bob_box.messages))) == sorted(
            map(repr, ["hi bob", {"id": 8}, "everyone"])
        )
        assert sorted(map(repr, (m.payload for m in alice_box.messages))) == sorted(
            map(repr, ["hi alice", {"id": 7}])
        )

        # ordering across processes
        await asyncio.gather(*(alice.send("bob", n) for n in range(300)))
        await assert_eventually(lambda: len(bob_box.messages) == 303, timeout=15)
        assert [m.payload for m in bob_box.messages[3:]] == list(range(300))

        # presence is shared
        async with agentpost.Client(one.target) as client:
            assert [a.agent_id for a in await client.list_agents(presence="online")] == [
                "alice",
                "bob",
            ]


async def test_unary_calls_on_one_process_reach_an_agent_on_another(spawn):
    one, two = await spawn(), await spawn()
    async with agentpost.connect(two.target, agent_id="worker") as worker:

        @worker.on_request
        async def work(message: agentpost.Message) -> dict[str, object]:
            return {"done": message.payload}

        async with agentpost.Client(one.target, agent_id="script") as client:
            reply = await client.request("worker", "task-1", timeout=5)
            assert reply.payload == {"done": "task-1"}
