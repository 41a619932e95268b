"""System events the server publishes on reserved topics, and metadata conversions."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from agentpost.errors import InvalidArgumentError
from agentpost.v1 import envelope_pb2, payload_pb2
from agentpost_server.core.ports import AgentRecord

SYSTEM_SENDER = "_agentpost"
AGENT_ONLINE = "_agentpost.agents.online"
AGENT_OFFLINE = "_agentpost.agents.offline"


def agent_online(record: AgentRecord) -> tuple[str, struct_pb2.Value]:
    return AGENT_ONLINE, to_value(
        {
            "event": "agent.online",
            "agent_id": record.agent_id,
            "capabilities": list(record.capabilities),
            "metadata": dict(record.metadata),
        }
    )


def agent_offline(agent_id: str) -> tuple[str, struct_pb2.Value]:
    return AGENT_OFFLINE, to_value({"event": "agent.offline", "agent_id": agent_id})


def to_value(data: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(data, value)
    return value


def struct_to_dict(struct: struct_pb2.Struct, field: str = "metadata") -> dict[str, Any]:
    try:
        return json_format.MessageToDict(struct)
    except ValueError:  # NaN and the infinities have no JSON form
        raise InvalidArgumentError(
            f"{field} holds a number that JSON cannot represent (NaN or infinity)",
            metadata={"field": field},
        ) from None


def system_envelope(message_id: str, topic: str, value: struct_pb2.Value) -> envelope_pb2.Envelope:
    """An EVENT envelope from the server itself on a reserved topic."""
    envelope = envelope_pb2.Envelope(
        id=message_id,
        sender=SYSTEM_SENDER,
        kind=envelope_pb2.MESSAGE_KIND_EVENT,
        payload=payload_pb2.Payload(json=value),
    )
    envelope.recipient.topic = topic
    envelope.created_at.GetCurrentTime()
    return envelope
