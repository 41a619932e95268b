"""A session's share of its agent's mailbox and the broadcasts it missed, delivered within a
window of unacknowledged deliveries (flow control: the rest waits in Redis).

Order of a pump's work, each time it is woken:
1. send the acknowledgements collected since last time;
2. on start, and whenever a fellow instance went away: adopt what dead instances of the agent
   held unacknowledged, then deliver everything this instance holds unacknowledged, oldest
   first (a reconnect with the same instance id gets its predecessor's deliveries again);
3. after the ack timeout: claim deliveries some instance has held too long;
4. new messages, as far as the window allows; then broadcasts missed while away.
"""

from __future__ import annotations

import asyncio
import logging
import time

from agentpost.errors import AgentpostError
from agentpost.v1 import envelope_pb2, messaging_pb2
from agentpost_server.core.ports import BroadcastLog, Entry, Mailboxes, PresenceStore
from agentpost_server.core.session import LocalSession

log = logging.getLogger(__name__)

MAILBOX = "m:"
BROADCAST = "b:"
_READ_CHUNK = 500


class MailboxPump:
    def __init__(
        self,
        session: LocalSession,
        mailboxes: Mailboxes,
        broadcasts: BroadcastLog,
        presence: PresenceStore,
        *,
        window: int,
        ack_timeout_ms: int,
    ) -> None:
        self._session = session
        self._mailboxes = mailboxes
        self._broadcasts = broadcasts
        self._presence = presence
        self.window = window
        self._ack_timeout_ms = ack_timeout_ms
        self._in_flight: set[str] = set()  # delivery ids sent and not acknowledged
        self._acks: list[str] = []
        self._broadcast_ack: str | None = None
        self._broadcast_cursor: str | None = None  # catching up from here; None when done
        self.broadcast_until: str | None = None  # the newest broadcast when delivery began
        self._adopt = True
        self._claim = False
        self._dirty = asyncio.Event()
        self._dirty.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pump-{self._session.id}")

    async def stop(self) -> None:
        """Stop, sending the acknowledgements already received."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self._send_acks()
        except AgentpostError as exc:
            log.warning("acks of session %s not saved: %s", self._session.id, exc)

    def wake(self) -> None:
        self._dirty.set()

    def adopt_soon(self) -> None:
        self._adopt = True
        self._dirty.set()

    def claim_soon(self) -> None:
        self._claim = True
        self._dirty.set()

    def live_broadcast(self, log_id: str) -> bool:
        """Whether a broadcast arriving live is this session's to deliver (not the catch-up's)."""
        return self.broadcast_until is None or _after(log_id, self.broadcast_until)

    def ack(self, delivery_id: str) -> bool:
        """Record an acknowledgement; False if the id is not one this server hands out."""
        if delivery_id.startswith(MAILBOX):
            self._acks.append(delivery_id[len(MAILBOX) :])
        elif delivery_id.startswith(BROADCAST):
            log_id = delivery_id[len(BROADCAST) :]
            if self._broadcast_ack is None or _after(log_id, self._broadcast_ack):
                self._broadcast_ack = log_id
        else:
            return False
        self._in_flight.discard(delivery_id)
        self._dirty.set()
        return True

    async def prepare(self) -> None:
        """Before the session is welcomed: where broadcast catch-up starts and ends. Broadcasts
        after `until` reach the session live; those up to it come from the log."""
        self._broadcast_cursor = await self._broadcasts.position(self._session.agent_id)
        self.broadcast_until = await self._broadcasts.latest()

    async def _run(self) -> None:
        session = self._session
        while not session.closed:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._step()
            except AgentpostError as exc:
                log.warning("delivering to session %s: %s; retrying", session.id, exc)
                await asyncio.sleep(1.0)
                self._dirty.set()

    async def _step(self) -> None:
        agent, me = self._session.agent_id, self._session.instance_id
        await self._send_acks()
        resend = False
        if self._adopt:
            self._adopt = False
            live = await self._presence.live_instances(agent)
            await self._mailboxes.adopt(agent, me, live - {me})
            resend = True
        if self._claim:
            self._claim = False
            if await self._mailboxes.claim_stale(agent, me, self._ack_timeout_ms, self.window):
                resend = True
        if resend:
            held = await self._mailboxes.read(agent, me, max(self.window, 1), pending=True)
            await self._deliver(
                [e for e in held if MAILBOX + e.stream_id not in self._in_flight], 1
            )
        while (room := self.window - len(self._in_flight)) > 0:
            entries = await self._mailboxes.read(agent, me, min(room, _READ_CHUNK), pending=False)
            if not entries:
                break
            await self._deliver(entries, 0)
        if self._broadcast_cursor is not None and (room := self.window - len(self._in_flight)) > 0:
            missed = await self._broadcasts.since(self._broadcast_cursor, min(room, _READ_CHUNK))
            for entry in missed:
                self._push(entry, BROADCAST, 0)
            self._broadcast_cursor = (
                missed[-1].stream_id if len(missed) == min(room, _READ_CHUNK) else None
            )
            if self._broadcast_cursor is not None:
                self._dirty.set()

    async def _deliver(self, entries: list[Entry], redeliveries: int) -> None:
        now_ms = time.time_ns() // 1_000_000
        expired = [e for e in entries if e.expires_ms and e.expires_ms <= now_ms]
        if expired:
            await self._mailboxes.dead_letter(self._session.agent_id, expired, "ttl expired")
        for entry in entries:
            if not (entry.expires_ms and entry.expires_ms <= now_ms):
                self._push(entry, MAILBOX, redeliveries)

    def _push(self, entry: Entry, kind: str, redeliveries: int) -> None:
        delivery_id = kind + entry.stream_id
        self._in_flight.add(delivery_id)
        self._session.push(
            messaging_pb2.ServerEvent(
                delivery=envelope_pb2.Envelope.FromString(entry.envelope),
                delivery_id=delivery_id,
                redeliveries=redeliveries,
            )
        )

    async def _send_acks(self) -> None:
        acks, self._acks = self._acks, []
        if acks:
            try:
                await self._mailboxes.ack(self._session.agent_id, acks)
            except AgentpostError:
                self._acks[:0] = acks
                raise
        position, self._broadcast_ack = self._broadcast_ack, None
        if position is not None:
            await self._broadcasts.advance(self._session.agent_id, position)


def _after(a: str, b: str) -> bool:
    """Stream id `a` is later than `b`."""
    a_ms, _, a_seq = a.partition("-")
    b_ms, _, b_seq = b.partition("-")
    return (int(a_ms or 0), int(a_seq or 0)) > (int(b_ms or 0), int(b_seq or 0))
