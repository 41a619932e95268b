"""What the server's audit trail records: who did what to what, and when (`AuditRecord`)."""

from __future__ import annotations

import dataclasses
import datetime

from agentpost.message import timestamp_or_none
from agentpost.v1 import tasks_pb2

__all__ = ["AuditRecord"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AuditRecord:
    """One audit record (`Agent.audit`, `Client.audit`)."""

    #: The record's id, sortable by time.
    id: str
    time: datetime.datetime | None
    #: The agent (or "agentpost", the server itself) that acted.
    actor: str
    #: What, for example "task.handoff", "task.completed", "auth.denied".
    action: str
    #: What it was done to: a task id, a workflow run id, an agent id.
    subject: str
    details: dict[str, str]

    @classmethod
    def from_proto(cls, record: tasks_pb2.AuditRecord) -> AuditRecord:
        return cls(
            id=record.id,
            time=timestamp_or_none(record, "time"),
            actor=record.actor,
            action=record.action,
            subject=record.subject,
            details=dict(record.details),
        )
