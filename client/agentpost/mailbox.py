"""What the server keeps for an agent that is away: its mailbox (`MailboxInfo`) and the messages
that could not be delivered (`DeadLetter`)."""

from __future__ import annotations

import dataclasses
import datetime

from agentpost.message import Message, timestamp_or_none
from agentpost.v1 import messaging_pb2

__all__ = ["DeadLetter", "MailboxInfo"]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class MailboxInfo:
    """The state of one agent's mailbox (times are aware UTC datetimes)."""

    agent_id: str
    #: Messages stored and not yet acknowledged (delivered or not).
    depth: int
    #: Of those, delivered and waiting for an acknowledgement.
    unacknowledged: int
    #: When the oldest stored message was accepted; `None` when the mailbox is empty.
    oldest_at: datetime.datetime | None
    #: Messages moved to the dead letters so far.
    dead_lettered: int

    @classmethod
    def from_proto(cls, response: messaging_pb2.GetMailboxResponse) -> MailboxInfo:
        return cls(
            agent_id=response.agent_id,
            depth=response.depth,
            unacknowledged=response.unacknowledged,
            oldest_at=timestamp_or_none(response, "oldest_at"),
            dead_lettered=response.dead_lettered,
        )


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class DeadLetter:
    """A message that expired or was trimmed before it was delivered."""

    #: The message as it was accepted (it cannot be acknowledged or answered).
    message: Message
    #: Why it was not delivered, for example "ttl expired" or "mailbox full".
    reason: str
    #: When it was moved to the dead letters; `None` if the server did not say.
    dead_at: datetime.datetime | None

    @classmethod
    def from_proto(cls, letter: messaging_pb2.DeadLetter) -> DeadLetter:
        return cls(
            message=Message.from_envelope(letter.envelope),
            reason=letter.reason,
            dead_at=timestamp_or_none(letter, "dead_at"),
        )
