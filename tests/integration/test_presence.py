"""Presence: the registry of agents, online/offline, and dead sessions detected within seconds."""

from __future__ import annotations

import os
import signal

import pytest

import agentpost
from tests.helpers import agent_process, assert_eventually


async def test_list_and_get_agents_with_filters(target, make_agent):
    await make_agent("coder-1", capabilities=["code", "test"], metadata={"model": "m1"})
    await make_agent("coder-2", capabilities=["code"])
    reviewer = await make_agent("reviewer", capabilities=["review"])
    await reviewer.close()
    async with agentpost.Client(target) as client:
        everyone = await client.list_agents()
        assert [a.agent_id for a in everyone] == ["coder-1", "coder-2", "reviewer"]
        coders = await client.list_agents(capability="code")
        assert [a.agent_id for a in coders] == ["coder-1", "coder-2"]
        await assert_eventually(lambda: _ids(client.list_agents(presence="offline"), ["reviewer"]))
        online = await client.list_agents(presence="online")
        assert [a.agent_id for a in online] == ["coder-1", "coder-2"]
        info = await client.get_agent("coder-1")
        assert info.online and info.sessions == 1
        assert list(info.capabilities) == ["code", "test"]
        assert info.metadata == {"model": "m1"}
        assert info.connected_since is not None and info.last_seen is not None
        gone = await client.get_agent("reviewer")
        assert not gone.online and gone.connected_since is None and gone.last_seen is not None
        with pytest.raises(agentpost.AgentNotFoundError):
            await client.get_agent("stranger")


async def _ids(pending, expected: list[str]) -> bool:
    return [a.agent_id for a in await pending] == expected


async def test_replicas_count_as_sessions_of_one_agent(target, make_agent):
    first = await make_agent("twin")
    await make_agent("twin")
    async with agentpost.Client(target) as client:
        assert (await client.get_agent("twin")).sessions == 2
        await first.close()
        await assert_eventually(lambda: _sessions(client, "twin", 1))


async def _sessions(client: agentpost.Client, agent_id: str, count: int) -> bool:
    return (await client.get_agent(agent_id)).sessions == count


@pytest.mark.timeout(30)
async def test_a_frozen_client_is_detected_by_keepalives(start_server):
    app = await start_server(keepalive_interval=0.3)
    target = f"127.0.0.1:{app.port}"
    async with agent_process(target, "frozen") as process, agentpost.Client(target) as client:
        assert (await client.get_agent("frozen")).online
        os.kill(process.pid, signal.SIGSTOP)  # alive, connected, silent
        await assert_eventually(lambda: _offline(client, "frozen"), timeout=10)


async def _offline(client: agentpost.Client, agent_id: str) -> bool:
    return not (await client.get_agent(agent_id)).online


@pytest.mark.timeout(30)
async def test_a_killed_client_shows_offline(target):
    async with agent_process(target, "doomed") as process, agentpost.Client(target) as client:
        process.kill()
        await assert_eventually(lambda: _offline(client, "doomed"), timeout=10)
