"""The hub: this server process's sessions, and how a message finds its recipients.

Outbound, the hub stamps an envelope (id, sender, time). A direct message goes to the
recipient's mailbox (and a wake-up to every server); a request or reply goes to the server
holding the chosen session (straight to it when that is this process); topic publishes and
broadcasts go to every server. Inbound, the bus hands the hub batches that it delivers to local
sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import duration_pb2, struct_pb2

from agentpost._status import to_error_proto
from agentpost.errors import (
    AgentNotFoundError,
    AgentpostError,
    InvalidArgumentError,
    LimitExceededError,
    NoResponderError,
    ProtocolViolationError,
    ServerShuttingDownError,
    UnknownRequestError,
)
from agentpost.v1 import agents_pb2, envelope_pb2, errors_pb2, messaging_pb2, payload_pb2
from agentpost_server.bus.v1 import bus_pb2
from agentpost_server.core import events, fanout, introduction, names, stamping
from agentpost_server.core.auth import Guard, Principal
from agentpost_server.core.ids import UlidFactory
from agentpost_server.core.limits import Limits
from agentpost_server.core.ports import (
    AgentRecord,
    Bus,
    Lane,
    Logs,
    Mailboxes,
    PresenceChange,
    PresenceStore,
)
from agentpost_server.core.pump import MailboxPump
from agentpost_server.core.ratelimit import RateLimiter
from agentpost_server.core.registry import SessionRegistry
from agentpost_server.core.requests import PendingRequests
from agentpost_server.core.session import InboundRequest, LocalSession
from agentpost_server.core.tasks.service import TaskService
from agentpost_server.core.workflows.driver import WorkflowService

log = logging.getLogger(__name__)

Kind = envelope_pb2.MessageKind
Envelope = envelope_pb2.Envelope
Payload = payload_pb2.Payload


class Hub:
    def __init__(
        self,
        *,
        server_id: str,
        bus: Bus,
        presence: PresenceStore,
        mailboxes: Mailboxes,
        logs: Logs,
        limits: Limits,
        guard: Guard | None = None,
        rate: RateLimiter | None = None,
    ) -> None:
        self.server_id = server_id
        self.limits = limits
        self.guard = guard or Guard(None)
        self.rate = rate or RateLimiter(0, 1)
        self._bus = bus
        self._presence = presence
        self.mailboxes = mailboxes
        self._logs = logs
        self._ids = UlidFactory()
        self.registry = SessionRegistry(server_id, presence, limits)
        self.requests = PendingRequests()
        self.accepting = True
        self._heartbeats = 0
        self._closing: set[asyncio.Task[None]] = set()
        self.tasks: TaskService | None = None  # set by the app; offers waiting tasks on connect
        self.workflows: WorkflowService | None = None  # set by the app; wakes run watchers

    # ---- sessions -------------------------------------------------------------------------

    async def open_session(
        self, intro: messaging_pb2.Introduce, principal: Principal | None = None
    ) -> LocalSession:
        """Open an agent session; `principal` (default: the introduction's word) must be allowed
        to be that agent, to advertise its capabilities and to subscribe to its patterns."""
        self._check_accepting()
        asked = introduction.check(intro, self.limits)
        agent_id, capabilities, patterns = asked.agent_id, asked.capabilities, asked.patterns
        metadata, instance_id, window = asked.metadata, asked.instance_id, asked.window
        principal = principal or Principal.open(agent_id)
        self.guard.act_as(principal, agent_id, "connect_as")
        self.guard.advertise(principal, agent_id, capabilities)
        self.guard.subscribe(principal, patterns)
        most = self.limits.max_sessions_per_agent
        if len(await self._presence.sessions_of(agent_id)) >= most:
            raise LimitExceededError(
                f"agent {agent_id!r} already has {most} sessions, the most it may hold",
                metadata={"limit": "max_sessions_per_agent", "max": str(most)},
            )
        session = self.registry.new_session(
            agent_id,
            registered=True,
            capabilities=capabilities,
            metadata=metadata,
            instance_id=instance_id,
            principal=principal,
            max_tasks=asked.max_tasks,
        )
        self.subscribe(session, patterns)
        record = AgentRecord(agent_id, capabilities, metadata, asked.max_tasks)
        try:
            came_online = await self._presence.add_session(
                record, session.id, self.server_id, instance_id
            )
        except BaseException:
            self.registry.forget(session)
            raise
        session.pump = MailboxPump(
            session,
            self.mailboxes,
            self._logs,
            self._presence,
            window=window,
            ack_timeout_ms=int(self.limits.ack_timeout * 1000),
        )
        try:
            session.durable = await self._logs.durable_subscriptions(agent_id)
            for durable_patterns in session.durable.values():
                # Saved under earlier permissions: only what the credential allows now.
                allowed = [p for p in durable_patterns if principal.may_subscribe(p)]
                self.registry.subscribe(session, allowed)
            await session.pump.prepare()
            await self._bus.announce(PresenceChange(agent_id, session.id, self.server_id, True))
            if came_online:
                self._system_event(events.agent_online(record))
        except BaseException:
            # Registered but not opened: take the session out of presence again.
            self.registry.forget(session)
            with contextlib.suppress(AgentpostError):
                await self._presence.remove_session(agent_id, session.id, self.server_id)
            raise
        log.info("session %s opened for agent %s", session.id, agent_id)
        if self.tasks is not None:
            self.tasks.on_agent_online(agent_id, capabilities)
        return session

    def start_delivery(self, session: LocalSession) -> None:
        """Begin mailbox delivery (after the welcome went out)."""
        if session.pump is not None:
            session.pump.start()

    def open_subscriber(
        self, principal: Principal, patterns: Iterable[str], broadcasts: bool
    ) -> LocalSession:
        self._check_accepting()
        checked = [names.check_pattern(p, "topics") for p in patterns]
        self.guard.subscribe(principal, checked)
        identity = principal.agent_id
        if not checked and not broadcasts:
            raise InvalidArgumentError(
                "subscribe to at least one topic or to broadcasts", metadata={"field": "topics"}
            )
        session = self.registry.new_session(
            identity, registered=False, broadcasts=broadcasts, principal=principal
        )
        self.subscribe(session, checked)
        return session

    def close_session_soon(self, session: LocalSession) -> asyncio.Task[None]:
        """`close_session` in a task that survives the caller's cancellation (stream teardown);
        `wait_closed` waits for every such task."""
        task = asyncio.create_task(self.close_session(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return task

    async def wait_closed(self) -> None:
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def close_session(
        self, session: LocalSession, error: AgentpostError | None = None
    ) -> None:
        """Forget a session (idempotent): fail what waits on it, and update presence."""
        session.close(error)
        if not self.registry.forget(session):
            return
        for message_id in list(session.outgoing_requests):
            self.requests.cancel(message_id)
        if session.pump is not None:
            await session.pump.stop()
        for message_id, inbound in session.inbound_requests.items():
            gone = NoResponderError(f"agent {session.agent_id!r} disconnected before replying")
            self._send_reply(session.agent_id, message_id, inbound, payload=None, error=gone)
        session.inbound_requests.clear()
        if not session.registered:
            return
        log.info("session %s of agent %s closed", session.id, session.agent_id)
        try:
            went_offline = await self._presence.remove_session(
                session.agent_id, session.id, self.server_id
            )
            await self._bus.announce(
                PresenceChange(session.agent_id, session.id, self.server_id, False)
            )
        except AgentpostError as exc:
            log.warning("could not record that session %s left: %s", session.id, exc)
            return
        if went_offline:
            self._system_event(events.agent_offline(session.agent_id))

    def subscribe(self, session: LocalSession, patterns: Iterable[str]) -> None:
        if session.principal is not None:
            self.guard.subscribe(session.principal, patterns)
        self.registry.subscribe(session, patterns)

    def unsubscribe(self, session: LocalSession, patterns: Iterable[str]) -> None:
        self.registry.unsubscribe(session, patterns)

    async def subscribe_durable(
        self, session: LocalSession, name: str, patterns: list[str]
    ) -> None:
        """Create (starting now) or update a durable subscription of the session's agent."""
        names.check_agent_id(name, "durable_name")
        if not patterns:
            raise InvalidArgumentError(
                "a durable subscription needs patterns", metadata={"field": "patterns"}
            )
        if session.pump is None:
            raise InvalidArgumentError("only agent sessions hold durable subscriptions")
        if session.principal is not None:
            self.guard.subscribe(session.principal, patterns)
        await self._logs.save_durable(session.agent_id, name, patterns)
        previous = session.durable.get(name, [])
        session.durable[name] = patterns
        self.registry.unsubscribe(session, [p for p in previous if p not in patterns])
        self.registry.subscribe(session, patterns)

    async def unsubscribe_durable(self, session: LocalSession, name: str) -> None:
        if not await self._logs.delete_durable(session.agent_id, name):
            raise InvalidArgumentError(
                f"no durable subscription {name!r}", metadata={"field": "durable_name"}
            )
        self.registry.unsubscribe(session, session.durable.pop(name, []))

    def local_sessions(self) -> list[LocalSession]:
        return list(self.registry.sessions.values())

    def local_agent_ids(self) -> list[str]:
        return list(self.registry.by_agent)

    def on_presence(self, change: PresenceChange) -> None:
        self.registry.on_presence(change)

    def on_bus_reset(self) -> None:
        self.registry.on_bus_reset()
        if self.tasks is not None:
            self.tasks.notify_all()
        if self.workflows is not None:
            self.workflows.notify_all()

    def on_task_event(self, task_id: str) -> None:
        if self.tasks is not None:
            self.tasks.notify(task_id)

    def on_workflow_event(self, run_id: str) -> None:
        if self.workflows is not None:
            self.workflows.notify(run_id)

    async def get_agent(self, agent_id: str) -> agents_pb2.AgentInfo:
        names.check_agent_id(agent_id)
        agent = await self._presence.get_agent(agent_id)
        if agent is None:
            raise AgentNotFoundError(
                f"no agent {agent_id!r} is known", metadata={"agent_id": agent_id}
            )
        return agent

    async def list_agents(self, capability: str, online: bool | None) -> list[agents_pb2.AgentInfo]:
        return await self._presence.list_agents(capability, online)

    async def shutdown(self, reason: str) -> None:
        """Refuse new work and tell every session to go elsewhere."""
        self.accepting = False
        for session in self.local_sessions():
            session.push(
                messaging_pb2.ServerEvent(going_away=messaging_pb2.GoingAway(reason=reason))
            )
            session.close()
        for session in self.local_sessions():
            await self.close_session(session)

    # ---- outbound ---------------------------------------------------------------------------

    async def send(
        self,
        sender: str,
        to: str,
        payload: Payload,
        headers: Mapping[str, str],
        ttl: duration_pb2.Duration | None = None,
        idempotency_key: str = "",
    ) -> tuple[Envelope, asyncio.Future[str]]:
        """Store a direct message in the recipient's mailbox and wake its sessions. The future
        resolves with the message id (the first one, for a repeated idempotency key)."""
        to = names.check_agent_id(to, "to")
        self.rate.take(sender)
        if len(idempotency_key) > 128:
            raise InvalidArgumentError(
                "idempotency_key is longer than 128 characters",
                metadata={"field": "idempotency_key"},
            )
        envelope = stamping.envelope(
            self._ids, self.limits, sender, Kind.MESSAGE_KIND_MESSAGE, payload, headers, agent=to
        )
        expires_ms = 0
        if ttl is not None and ttl.ByteSize():
            seconds = ttl.ToNanoseconds() / 1e9
            if not 0 < seconds <= self.limits.max_ttl:
                raise InvalidArgumentError(
                    f"ttl must be between 0 and {self.limits.max_ttl:g} seconds",
                    metadata={"field": "ttl"},
                )
            expires_ms = time.time_ns() // 1_000_000 + int(seconds * 1000)
        stored = self.mailboxes.append(sender, to, envelope, expires_ms, idempotency_key)
        self._bus.wake(to)
        accepted: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def done(future: asyncio.Future[Any]) -> None:
            if future.cancelled():
                accepted.cancel()
            elif (exc := future.exception()) is not None:
                accepted.set_exception(exc)
            elif future.result() is None:
                accepted.set_exception(
                    AgentNotFoundError(
                        f"no agent {to!r} is known: it never connected and was not registered",
                        metadata={"agent_id": to},
                    )
                )
            else:
                result = future.result()
                accepted.set_result(result.decode() if isinstance(result, bytes) else str(result))

        stored.add_done_callback(done)
        return envelope, accepted

    def ack(self, session: LocalSession, delivery_ids: Iterable[str]) -> None:
        if session.pump is None:
            raise InvalidArgumentError("this session has nothing to acknowledge")
        for delivery_id in delivery_ids:
            if not session.pump.ack(delivery_id):
                raise InvalidArgumentError(
                    f"{delivery_id[:64]!r} is not a delivery id", metadata={"field": "delivery_ids"}
                )

    async def register_agent(
        self, agent: AgentRecord, principal: Principal | None = None
    ) -> agents_pb2.AgentInfo:
        """Make an agent known; an enforced `principal` registers only itself (an admin: any)."""
        names.check_agent_id(agent.agent_id)
        names.check_capabilities(agent.capabilities)
        if principal is not None and not principal.is_admin:
            self.guard.act_as(principal, agent.agent_id, "register")
            self.guard.advertise(principal, agent.agent_id, agent.capabilities)
        await self._presence.register(agent)
        return await self.get_agent(agent.agent_id)

    def publish(
        self,
        sender: str,
        topic: str | None,
        payload: Payload,
        headers: Mapping[str, str],
        include_self: bool = False,
        principal: Principal | None = None,
    ) -> tuple[Envelope, asyncio.Future[None]]:
        """Publish on `topic`, or broadcast when it is None (`principal`, if given, must be
        allowed to)."""
        if principal is not None:
            self.guard.publish(principal, topic)
        self.rate.take(sender)
        if topic is None:
            envelope = stamping.envelope(
                self._ids, self.limits, sender, Kind.MESSAGE_KIND_MESSAGE, payload, headers
            )
            lane = Lane.BROADCAST
        else:
            names.check_topic(topic)
            envelope = stamping.envelope(
                self._ids,
                self.limits,
                sender,
                Kind.MESSAGE_KIND_MESSAGE,
                payload,
                headers,
                topic=topic,
            )
            lane = Lane.TOPICS
        routed = bus_pb2.Routed(envelope=envelope, include_self=include_self)
        return envelope, self._bus.publish(lane, routed)

    async def request(
        self,
        sender: str,
        to: str,
        payload: Payload,
        headers: Mapping[str, str],
        reply_within: duration_pb2.Duration | float | None,
        *,
        session: LocalSession | None = None,
        operation_id: str = "",
    ) -> tuple[Envelope, asyncio.Future[None], asyncio.Future[Envelope] | None]:
        """Route a request. Returns the envelope, the bus future and, for a call without a
        session, the reply future; a session gets the reply (or the timeout) as an event."""
        to = names.check_agent_id(to, "to")
        if session is not None and len(session.outgoing_requests) >= (
            most := self.limits.max_inflight_requests
        ):
            raise LimitExceededError(
                f"this session already waits for {most} replies, the most it may",
                metadata={"limit": "max_inflight_requests", "max": str(most)},
            )
        self.rate.take(sender)
        seconds = stamping.request_timeout(self.limits, reply_within)
        envelope = stamping.envelope(
            self._ids, self.limits, sender, Kind.MESSAGE_KIND_REQUEST, payload, headers, agent=to
        )
        session_id, server_id = await self.registry.pick(to, sender, NoResponderError)
        deadline_ms = time.time_ns() // 1_000_000 + int(seconds * 1000)
        reply_to = session.id if session is not None else "call"
        routed = bus_pb2.Routed(
            envelope=envelope,
            target_session=session_id,
            reply_server=self.server_id,
            reply_session=reply_to,
            reply_operation=operation_id,
            deadline_unix_ms=deadline_ms,
        )
        reply = self.requests.expect(envelope.id, seconds, to, session, operation_id)
        sent = self._route(routed, server_id)
        return envelope, sent, reply

    def reply(
        self, session: LocalSession, message: messaging_pb2.ReplyMessage
    ) -> tuple[Envelope, asyncio.Future[None]]:
        inbound = session.inbound_requests.pop(message.correlation_id, None)
        if inbound is not None and inbound.deadline_ms < time.time_ns() // 1_000_000:
            inbound = None  # the requester stopped waiting: refuse rather than drop silently
        if inbound is None:
            raise UnknownRequestError(
                f"no request {message.correlation_id!r} is waiting for this session's reply"
                " (unknown, already answered, or timed out)",
                metadata={"field": "correlation_id"},
            )
        error = message.error if message.HasField("error") else None
        return self._send_reply(
            session.agent_id,
            message.correlation_id,
            inbound,
            payload=message.payload,
            headers=message.headers,
            error_proto=error,
        )

    # ---- inbound (called by the bus) ----------------------------------------------------------

    def on_routed(self, lane: Lane, batch: bus_pb2.BusBatch) -> None:
        if lane is Lane.SERVER:
            for item in batch.items:
                self._on_addressed(item)
        elif lane is Lane.WAKE:
            fanout.wake(self.registry, batch)
        elif lane is Lane.TOPICS:
            fanout.topics(self.registry, batch)
        else:
            fanout.broadcasts(self.registry, batch)

    # ---- upkeep -----------------------------------------------------------------------------

    async def tick(self) -> None:
        """Once per keep-alive interval: keep-alives out, silent sessions closed, presence kept."""
        now = time.monotonic()
        now_ms = time.time_ns() // 1_000_000
        silent_after = 3 * self.limits.keepalive_interval
        keep_alive = messaging_pb2.ServerEvent(keep_alive=messaging_pb2.KeepAlive())
        for session in self.local_sessions():
            for message_id in [
                m for m, r in session.inbound_requests.items() if r.deadline_ms < now_ms
            ]:
                del session.inbound_requests[message_id]
            if not session.registered:
                continue
            if session.pump is not None:
                session.pump.claim_soon()  # redeliver what waited past the ack timeout
            if now - session.last_heard > silent_after:
                log.info(
                    "session %s of %s was silent for %.0fs: closing",
                    session.id,
                    session.agent_id,
                    now - session.last_heard,
                )
                await self.close_session(
                    session,
                    ProtocolViolationError(
                        f"no keep-alive for {silent_after:.0f}s; the session is closed"
                    ),
                )
            else:
                session.push(keep_alive)
        await self.heartbeat()

    async def heartbeat(self) -> None:
        """Keep this server alive in the registry; if it was reaped as dead (a long pause),
        register its live sessions again."""
        ttl = 3 * self.limits.keepalive_interval
        unknown = await self._presence.heartbeat(self.server_id, self.local_agent_ids(), ttl)
        if unknown and self._heartbeats:
            log.warning("this server was taken for dead; registering its sessions again")
            for session in self.local_sessions():
                if session.registered:
                    record = AgentRecord(
                        session.agent_id, session.capabilities, session.metadata, session.max_tasks
                    )
                    await self._presence.add_session(
                        record, session.id, self.server_id, session.instance_id
                    )
        self._heartbeats += 1

    # ---- internals ----------------------------------------------------------------------------

    def _on_addressed(self, item: bus_pb2.Routed) -> None:
        envelope = item.envelope
        if envelope.kind == Kind.MESSAGE_KIND_REPLY:
            self.requests.resolve(envelope, item.reply_operation)
            return
        session = self.registry.sessions.get(item.target_session)
        if session is None or session.closed:
            session = self.registry.any_local_session(envelope.recipient.agent_id)
        if envelope.kind == Kind.MESSAGE_KIND_REQUEST:
            inbound = InboundRequest(
                envelope.sender,
                item.reply_server,
                item.reply_session,
                item.reply_operation,
                item.deadline_unix_ms,
            )
            if session is None:
                gone = NoResponderError(f"agent {envelope.recipient.agent_id!r} went away")
                self._send_reply(
                    envelope.recipient.agent_id, envelope.id, inbound, None, error=gone
                )
                return
            session.inbound_requests[envelope.id] = inbound
        elif session is None:
            log.warning(
                "message %s for %s dropped: the session left before delivery",
                envelope.id,
                envelope.recipient.agent_id,
            )
            return
        session.deliver(envelope)

    def _send_reply(
        self,
        responder: str,
        correlation_id: str,
        inbound: InboundRequest,
        payload: Payload | None,
        *,
        headers: Mapping[str, str] | None = None,
        error: AgentpostError | None = None,
        error_proto: errors_pb2.Error | None = None,
    ) -> tuple[Envelope, asyncio.Future[None]]:
        envelope = stamping.envelope(
            self._ids,
            self.limits,
            responder,
            Kind.MESSAGE_KIND_REPLY,
            payload,
            headers or {},
            agent=inbound.requester,
            correlation_id=correlation_id,
        )
        if error is not None:
            envelope.error.CopyFrom(to_error_proto(error))
        elif error_proto is not None:
            envelope.error.CopyFrom(error_proto)
            if not envelope.error.code:
                envelope.error.code = 2  # UNKNOWN
            if not envelope.error.reason:
                envelope.error.reason = errors_pb2.ERROR_REASON_HANDLER_FAILED
        routed = bus_pb2.Routed(
            envelope=envelope,
            target_session=inbound.reply_session,
            reply_operation=inbound.reply_operation,
        )
        return envelope, self._route(routed, inbound.reply_server)

    def _system_event(self, event: tuple[str, struct_pb2.Value]) -> None:
        envelope = events.system_envelope(self._ids.new(), *event)
        future = self._bus.publish(Lane.TOPICS, bus_pb2.Routed(envelope=envelope))
        future.add_done_callback(self._log_failure)

    def _route(self, routed: bus_pb2.Routed, server_id: str) -> asyncio.Future[Any]:
        """Requests and replies for a session of this very process skip Redis (as NATS does for
        local subscribers); others go over the bus to the server holding the session."""
        if server_id != self.server_id:
            return self._bus.publish(Lane.SERVER, routed, server_id)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        self._on_addressed(routed)
        return done

    def _log_failure(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            level = logging.WARNING if self.accepting else logging.DEBUG  # quiet while stopping
            log.log(level, "could not publish a system event: %s", future.exception())

    def _check_accepting(self) -> None:
        if not self.accepting:
            raise ServerShuttingDownError("the server is shutting down; connect to another one")
