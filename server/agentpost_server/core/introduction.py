"""What a Connect stream's first frame (`Introduce`) asks for, checked: names, metadata size,
instance id, delivery window and task limit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agentpost.errors import InvalidArgumentError
from agentpost.v1 import messaging_pb2
from agentpost_server.core import events, names
from agentpost_server.core.ids import new_instance_id
from agentpost_server.core.limits import Limits

MAX_TASKS_PER_AGENT = 100_000


@dataclass(frozen=True, slots=True)
class Introduction:
    agent_id: str
    capabilities: list[str]
    patterns: list[str]
    metadata: dict[str, Any]
    instance_id: str
    window: int  # unacknowledged deliveries in flight
    max_tasks: int  # 0: no limit


def check(intro: messaging_pb2.Introduce, limits: Limits) -> Introduction:
    """The introduction, validated (InvalidArgumentError and its kinds otherwise)."""
    agent_id = names.check_agent_id(intro.agent_id)
    capabilities = names.check_capabilities(intro.capabilities)
    patterns = [names.check_pattern(p, "subscriptions") for p in intro.subscriptions]
    if intro.metadata.ByteSize() > limits.max_metadata_bytes:
        raise InvalidArgumentError(
            f"metadata is {intro.metadata.ByteSize()} bytes; the limit is"
            f" {limits.max_metadata_bytes}",
            metadata={"field": "metadata"},
        )
    instance_id = (
        names.check_agent_id(intro.instance_id, "instance_id")
        if intro.instance_id
        else new_instance_id()
    )
    if intro.max_unacked < 0:
        raise InvalidArgumentError(
            "max_unacked must not be negative", metadata={"field": "max_unacked"}
        )
    if not 0 <= intro.max_tasks <= MAX_TASKS_PER_AGENT:
        raise InvalidArgumentError(
            f"max_tasks must be between 0 (no limit) and {MAX_TASKS_PER_AGENT}",
            metadata={"field": "max_tasks"},
        )
    return Introduction(
        agent_id=agent_id,
        capabilities=capabilities,
        patterns=patterns,
        metadata=events.struct_to_dict(intro.metadata),
        instance_id=instance_id,
        window=min(intro.max_unacked or limits.default_window, limits.max_window),
        max_tasks=intro.max_tasks,
    )
