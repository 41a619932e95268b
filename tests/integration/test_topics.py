"""Topics: exact names and wildcard patterns, once per subscriber; presence events."""

from __future__ import annotations

import asyncio

import agentpost
from tests.helpers import assert_eventually


async def test_overlapping_patterns_deliver_once(make_agent, inbox):
    sub = await make_agent("sub", subscriptions=["builds.done"])
    await sub.subscribe("builds.*", "builds.>", ">")
    box = inbox(sub)
    other = inbox(await make_agent("other", subscriptions=["deploys.*"]))
    pub = await make_agent("pub")
    await pub.publish("builds.done", {"ok": True})
    await pub.publish("deploys.prod", "go")
    await assert_eventually(lambda: len(box.messages) == 2 and len(other.messages) == 1)
    await asyncio.sleep(0.1)  # nothing more arrives: the overlaps did not duplicate
    assert [m.topic for m in box.messages] == ["builds.done", "deploys.prod"]
    assert other.messages[0].topic == "deploys.prod"


async def test_unsubscribe_stops_delivery(make_agent, inbox):
    sub = await make_agent("sub", subscriptions=["news.*"])
    box = inbox(sub)
    pub = await make_agent("pub")
    await pub.publish("news.a", 1)
    await assert_eventually(lambda: len(box.messages) == 1)
    await sub.unsubscribe("news.*")
    await pub.publish("news.b", 2)
    await sub.subscribe("sync.point")
    await pub.publish("sync.point", 3)
    await assert_eventually(lambda: len(box.messages) == 2)
    assert box.payloads() == [1, 3]


async def test_publisher_does_not_hear_itself_unless_it_asks(make_agent, inbox):
    agent = await make_agent("echoer", subscriptions=["chat"])
    box = inbox(agent)
    await agent.publish("chat", "quiet")
    await agent.publish("chat", "loud", include_self=True)
    await assert_eventually(lambda: len(box.messages) == 1)
    assert box.payloads() == ["loud"]


async def test_unary_subscribe_receives_topics_and_broadcasts(target, make_agent):
    async with agentpost.Client(target, agent_id="watcher") as client:
        received: list[agentpost.Message] = []

        async def watch() -> None:
            async for message in client.subscribe(["alerts.>"], broadcasts=True):
                received.append(message)

        task = asyncio.create_task(watch())
        pub = await make_agent("pub")

        async def subscribed() -> bool:
            await pub.publish("alerts.cpu", "probe")
            return bool(received)

        await assert_eventually(subscribed)
        await pub.broadcast("all hands")
        await assert_eventually(lambda: any(m.broadcast for m in received))
        task.cancel()


async def test_agents_joining_and_leaving_are_published_on_the_system_topic(make_agent, inbox):
    observer = await make_agent("observer", subscriptions=["_agentpost.agents.*"])
    box = inbox(observer)
    newcomer = await make_agent("newcomer", capabilities=["code"], metadata={"lang": "py"})

    def about_newcomer() -> list[agentpost.Message]:
        return [m for m in box.messages if m.payload["agent_id"] == "newcomer"]

    await assert_eventually(lambda: len(about_newcomer()) == 1)
    online = about_newcomer()[0]
    assert online.kind == agentpost.MessageKind.EVENT
    assert online.topic == "_agentpost.agents.online"
    assert online.payload["agent_id"] == "newcomer"
    assert online.payload["capabilities"] == ["code"]
    assert online.payload["metadata"] == {"lang": "py"}
    await newcomer.close()
    await assert_eventually(lambda: len(about_newcomer()) == 2)
    offline = about_newcomer()[1]
    assert offline.topic == "_agentpost.agents.offline"
    assert offline.payload == {"event": "agent.offline", "agent_id": "newcomer"}


async def test_clients_cannot_publish_on_system_topics(make_agent):
    agent = await make_agent("spoofer")
    import pytest

    with pytest.raises(agentpost.InvalidTopicError, match="reserved"):
        await agent.publish("_agentpost.agents.online", {"agent_id": "fake"})


async def test_anonymous_publishers_reach_anonymous_subscribers(target):
    async with agentpost.Client(target) as listener, agentpost.Client(target) as publisher:
        received: list[agentpost.Message] = []

        async def watch() -> None:
            async for message in listener.subscribe(["shell.chat"]):
                received.append(message)

        task = asyncio.create_task(watch())

        async def arrived() -> bool:
            await publisher.publish("shell.chat", "hello from another shell")
            return bool(received)

        await assert_eventually(arrived)
        assert received[0].sender == "anonymous"
        task.cancel()
