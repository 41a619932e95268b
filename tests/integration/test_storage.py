"""What is read back from Redis is validated, never evaluated: corrupt records are skipped."""

from __future__ import annotations

import pickle

from redis.asyncio import Redis

import agentpost
from agentpost_server.store.keys import Keys


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, ("raise SystemExit('unpickled!')",))


async def test_corrupt_records_are_skipped(target: str, redis_url: str, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    async with agentpost.Client(target) as client:
        await client.register_agent("victim", capabilities=["code"])
    redis = Redis.from_url(redis_url)
    try:
        await redis.hset(keys.agent("victim"), "metadata", pickle.dumps(_Boom()))
        await redis.hset(keys.agent("victim"), "capabilities", "{not json")
        await redis.hset(keys.durable_patterns("victim"), "bad", pickle.dumps(_Boom()))
        await redis.hset(keys.durable_patterns("victim"), "odd", '["ok.>", "no spaces allowed"]')
    finally:
        await redis.aclose()
    async with agentpost.Client(target) as client:
        info = await client.get_agent("victim")
        assert not info.capabilities and not info.metadata  # malformed: left empty
        assert any(a.agent_id == "victim" for a in await client.list_agents())
    async with agentpost.connect(target, agent_id="victim") as agent:
        await agent.send("victim", "still works")
        async for message in agent.messages():
            assert message.payload == "still works"
            break


async def test_a_malformed_mailbox_entry_is_dead_lettered_not_delivered(
    target: str, redis_url: str, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    async with agentpost.connect(target, agent_id="victim") as agent:
        redis = Redis.from_url(redis_url)
        try:
            await redis.xadd(keys.mailbox("victim"), {"e": b"\xff\xff\xff", "x": "0"})
        finally:
            await redis.aclose()
        async with agentpost.Client(target, agent_id="friend") as client:
            sent = await client.send("victim", "after the garbage")
            async for message in agent.messages():
                assert (message.id, message.payload) == (sent, "after the garbage")
                break
            letters = await client.list_dead_letters(agent_id="victim")
    assert [letter.reason for letter in letters] == ["malformed"]
