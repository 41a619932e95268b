"""Delivering what every server process sees (topic publishes, broadcasts, mailbox wake-ups) to
this process's own sessions."""

from __future__ import annotations

from agentpost.v1 import envelope_pb2, messaging_pb2
from agentpost_server.bus.v1 import bus_pb2
from agentpost_server.core import pump
from agentpost_server.core.registry import SessionRegistry
from agentpost_server.core.session import LocalSession
from agentpost_server.core.topics import pattern_matches


def wake(registry: SessionRegistry, batch: bus_pb2.BusBatch) -> None:
    for agent_id in batch.wake:
        for session in registry.by_agent.get(agent_id, ()):
            if session.pump is not None:
                session.pump.wake()


def topics(registry: SessionRegistry, batch: bus_pb2.BusBatch) -> None:
    for item in batch.items:
        envelope = item.envelope
        for session in registry.topics.match(envelope.recipient.topic):
            if item.include_self or not _is_own(session, envelope.sender):
                _deliver_topic(session, envelope, item.log_id)


def broadcasts(registry: SessionRegistry, batch: bus_pb2.BusBatch) -> None:
    for item in batch.items:
        envelope = item.envelope
        logged = messaging_pb2.ServerEvent(
            delivery=envelope, delivery_id=pump.BROADCAST + item.log_id
        )
        plain = messaging_pb2.ServerEvent(delivery=envelope)
        for session in registry.sessions.values():
            if not session.broadcasts or (
                not item.include_self and _is_own(session, envelope.sender)
            ):
                continue
            if session.pump is None or not item.log_id:
                session.push(plain)
            elif session.pump.live(pump.BROADCASTS, item.log_id):
                session.push(logged)


def _is_own(session: LocalSession, sender: str) -> bool:
    """A publish skips the sender's own agent sessions (receive-only subscriptions of unary
    callers are never "own": every such caller may share the name "anonymous")."""
    return session.registered and session.agent_id == sender


def _deliver_topic(session: LocalSession, envelope: envelope_pb2.Envelope, log_id: str) -> None:
    """Live topic delivery: with a delivery id when one of the session's durable subscriptions
    covers the topic (unless that subscription's catch-up will deliver it), else plain."""
    if session.durable and log_id and session.pump is not None:
        tokens = envelope.recipient.topic.split(".")
        for name, patterns in session.durable.items():
            if any(pattern_matches(p.split("."), tokens) for p in patterns):
                if session.pump.live(name, log_id):
                    session.push(
                        messaging_pb2.ServerEvent(
                            delivery=envelope, delivery_id=f"{pump.TOPIC}{name}:{log_id}"
                        )
                    )
                return
    session.deliver(envelope)
