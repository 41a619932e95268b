"""The sessions this server process holds, their topic subscriptions, and a cache of where every
other agent's sessions live (kept current by presence announcements, refilled from storage on a
miss)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

from agentpost.errors import AgentOfflineError, LimitExceededError
from agentpost_server.core.ids import new_session_id
from agentpost_server.core.limits import Limits
from agentpost_server.core.ports import PresenceChange, PresenceStore
from agentpost_server.core.session import LocalSession
from agentpost_server.core.topics import TopicIndex


class SessionRegistry:
    def __init__(self, server_id: str, presence: PresenceStore, limits: Limits) -> None:
        self.server_id = server_id
        self._presence = presence
        self._limits = limits
        self.sessions: dict[str, LocalSession] = {}
        self.by_agent: dict[str, set[LocalSession]] = {}
        self.topics: TopicIndex[LocalSession] = TopicIndex()
        self._cache: dict[str, dict[str, str]] = {}  # agent id -> {session id: server id}

    def new_session(self, agent_id: str, **kwargs: object) -> LocalSession:
        session = LocalSession(
            id=new_session_id(),
            agent_id=agent_id,
            max_buffered=self._limits.max_buffered_events,
            **kwargs,  # type: ignore[arg-type]
        )
        self.sessions[session.id] = session
        if session.registered:
            self.by_agent.setdefault(agent_id, set()).add(session)
            self._cache.setdefault(agent_id, {})[session.id] = self.server_id
        return session

    def forget(self, session: LocalSession) -> bool:
        """Remove a session; False if it was already gone."""
        known = self.sessions.pop(session.id, None) is not None
        self.unsubscribe(session, list(session.subscriptions))
        local = self.by_agent.get(session.agent_id)
        if local is not None and session.registered:
            local.discard(session)
            if not local:
                del self.by_agent[session.agent_id]
            cached = self._cache.get(session.agent_id)
            if cached is not None:
                cached.pop(session.id, None)
                if not cached:
                    del self._cache[session.agent_id]
        return known

    def subscribe(self, session: LocalSession, patterns: Iterable[str]) -> None:
        for pattern in patterns:
            if pattern in session.subscriptions:
                continue
            if len(session.subscriptions) >= self._limits.max_subscriptions:
                most = self._limits.max_subscriptions
                raise LimitExceededError(
                    f"a session may hold at most {most} subscriptions",
                    metadata={"field": "patterns", "limit": "max_subscriptions", "max": str(most)},
                )
            session.subscriptions.add(pattern)
            self.topics.add(session, pattern)

    def unsubscribe(self, session: LocalSession, patterns: Iterable[str]) -> None:
        for pattern in patterns:
            if pattern in session.subscriptions:
                session.subscriptions.discard(pattern)
                self.topics.remove(session, pattern)

    def any_local_session(self, agent_id: str) -> LocalSession | None:
        for session in self.by_agent.get(agent_id, ()):
            if not session.closed:
                return session
        return None

    async def pick(self, to: str, sender: str, missing: type[AgentOfflineError]) -> tuple[str, str]:
        """One live session of `to` (sticky per sender, so a sender's requests stay in order):
        (session id, server id)."""
        sessions = self._cache.get(to)
        if not sessions:
            sessions = await self._presence.sessions_of(to)
            if sessions:
                self._cache[to] = sessions
        if not sessions:
            raise missing(f"agent {to!r} is not connected", metadata={"agent_id": to})
        if len(sessions) == 1:
            return next(iter(sessions.items()))
        ordered = sorted(sessions)
        chosen = ordered[zlib.crc32(sender.encode()) % len(ordered)]
        return chosen, sessions[chosen]

    def on_presence(self, change: PresenceChange) -> None:
        if not change.added:  # a fellow instance left: take over what it had not acknowledged
            for session in self.by_agent.get(change.agent_id, ()):
                if session.pump is not None and session.id != change.session_id:
                    session.pump.adopt_soon()
        if change.server_id == self.server_id:
            return
        known = self._cache.get(change.agent_id)
        if known is None:
            return  # not cached: the next lookup reads the whole set from storage
        if change.added:
            known[change.session_id] = change.server_id
        else:
            known.pop(change.session_id, None)
            if not known:
                del self._cache[change.agent_id]

    def on_bus_reset(self) -> None:
        """The bus was reconnected: what it said meanwhile is lost. Forget where other agents'
        sessions are, and have every pump read its mailbox (a wake-up may have been missed) and
        catch up on the broadcast and topic logs (a live publish may have been missed)."""
        self._cache.clear()
        for agent_id, sessions in self.by_agent.items():
            self._cache[agent_id] = {s.id: self.server_id for s in sessions}
            for session in sessions:
                if session.pump is not None:
                    session.pump.wake()
                    session.pump.catch_up_soon()
