"""Helpers for the messaging-pattern tests: agents that close themselves, message collectors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

import agentpost


class Inbox:
    """Collects an agent's messages in the background."""

    def __init__(self, agent: agentpost.Agent) -> None:
        self.agent = agent
        self.messages: list[agentpost.Message] = []
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for message in self.agent.messages():
            self.messages.append(message)

    def payloads(self) -> list[Any]:
        return [m.payload for m in self.messages]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


MakeAgent = Callable[..., Awaitable[agentpost.Agent]]


@pytest.fixture
async def make_agent(target: str) -> AsyncIterator[MakeAgent]:
    """Factory: `await make_agent("alice", ...)` -> a connected Agent, closed at the end."""
    agents: list[agentpost.Agent] = []

    async def make(agent_id: str, *, server: str | None = None, **kwargs: Any) -> agentpost.Agent:
        agent = await agentpost.connect(server or target, agent_id=agent_id, **kwargs)
        agents.append(agent)
        return agent

    yield make
    await asyncio.gather(*(a.close() for a in agents), return_exceptions=True)


MakeInbox = Callable[[agentpost.Agent], Inbox]


@pytest.fixture
async def inbox() -> AsyncIterator[MakeInbox]:
    made: list[Inbox] = []

    def make(agent: agentpost.Agent) -> Inbox:
        box = Inbox(agent)
        made.append(box)
        return box

    yield make
    for box in made:
        await box.close()
