"""A session's share of its agent's mailbox and the broadcasts it missed, delivered within a
window of unacknowledged deliveries (flow control: the rest waits in Redis).

Order of a pump's work, each time it is woken:
1. send the acknowledgements collected since last time;
2. on start, and whenever a fellow instance went away: adopt what dead instances of the agent
   held unacknowledged, then deliver everything this instance holds unacknowledged, oldest
   first (a reconnect with the same instance id gets its predecessor's deliveries again);
3. after the ack timeout: claim deliveries some instance has held too long;
4. new messages, as far as the window allows; then what was missed while away from the broadcast
   log and, per durable topic subscription, from the topic log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from agentpost.errors import AgentpostError
from agentpost.v1 import envelope_pb2
from agentpost_server.core import wire
from agentpost_server.core.ports import Entry, Logs, Mailboxes, PresenceStore
from agentpost_server.core.session import LocalSession
from agentpost_server.core.topics import pattern_matches

log = logging.getLogger(__name__)

BROADCASTS = ""  # the position name of the broadcast log
MAILBOX = "m:"
BROADCAST = "b:"
TOPIC = "t:"  # t:<durable name>:<log id>
_READ_CHUNK = 500


@dataclass(slots=True)
class CatchUp:
    """Reading one log from the agent's position up to where live delivery took over."""

    name: str  # "" for broadcasts, else the durable subscription's name
    log: str
    prefix: str
    cursor: str
    until: str
    patterns: list[list[str]] | None = None
    done: bool = False

    def wants(self, entry: Entry) -> bool:
        if self.patterns is None:
            return well_formed(entry)
        try:
            topic = envelope_pb2.Envelope.FromString(entry.envelope).recipient.topic.split(".")
        except DecodeError:
            log.warning("skipping a malformed entry %s of the %s log", entry.stream_id, self.log)
            return False
        return any(pattern_matches(p, topic) for p in self.patterns)


def well_formed(entry: Entry) -> bool:
    """Stored envelopes are validated on the way out (about half a microsecond): one that does
    not decode would break every frame it is delivered in, again on every reconnect."""
    try:
        envelope_pb2.Envelope.FromString(entry.envelope)
    except DecodeError:
        return False
    return True


class MailboxPump:
    def __init__(
        self,
        session: LocalSession,
        mailboxes: Mailboxes,
        logs: Logs,
        presence: PresenceStore,
        *,
        window: int,
        ack_timeout_ms: int,
    ) -> None:
        self._session = session
        self._mailboxes = mailboxes
        self._logs = logs
        self._presence = presence
        self.window = window
        self._ack_timeout_ms = ack_timeout_ms
        self._in_flight: set[str] = set()  # delivery ids sent and not acknowledged
        self._acks: list[str] = []
        self._positions: dict[str, str] = {}  # position name -> newest acknowledged log id
        self._catch_ups: dict[str, CatchUp] = {}  # by position name
        self._adopt = True
        self._claim = False
        self._recatch = False
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

    def catch_up_soon(self) -> None:
        """Read the logs again from the agent's positions: live fan-out may have missed entries
        (the bus was reconnected). What comes twice carries the same message id."""
        self._recatch = True
        self._dirty.set()

    def claim_soon(self) -> None:
        self._claim = True
        self._dirty.set()

    def live(self, name: str, log_id: str) -> bool:
        """Whether a log entry arriving live is this session's to deliver now (rather than the
        catch-up's, which reaches it in order)."""
        catch_up = self._catch_ups.get(name)
        return catch_up is None or _after(log_id, catch_up.until)

    def ack(self, delivery_id: str) -> bool:
        """Record an acknowledgement; False if the id is not one this server hands out."""
        if delivery_id.startswith(MAILBOX):
            self._acks.append(delivery_id[len(MAILBOX) :])
        elif delivery_id.startswith(BROADCAST):
            self._moved(BROADCASTS, delivery_id[len(BROADCAST) :])
        elif delivery_id.startswith(TOPIC):
            name, _, log_id = delivery_id[len(TOPIC) :].rpartition(":")
            if not name:
                return False
            if name in self._session.durable:  # else: unsubscribed meanwhile, nothing to move
                self._moved(name, log_id)
        else:
            return False
        self._in_flight.discard(delivery_id)
        self._dirty.set()
        return True

    def _moved(self, name: str, log_id: str) -> None:
        current = self._positions.get(name)
        if current is None or _after(log_id, current):
            self._positions[name] = log_id

    async def prepare(self) -> None:
        """Before the session is welcomed: where each catch-up starts and ends. Entries after
        `until` reach the session live; those up to it come from the log."""
        await self.add_catch_up(BROADCASTS, None)
        for name, patterns in self._session.durable.items():
            await self.add_catch_up(name, patterns)

    async def add_catch_up(self, name: str, patterns: list[str] | None) -> None:
        log_name = "broadcasts" if name == BROADCASTS else "topics"
        cursor = await self._logs.position(self._session.agent_id, name)
        until = await self._logs.latest(log_name)
        if _after(until, cursor):
            split = None if patterns is None else [p.split(".") for p in patterns]
            prefix = BROADCAST if name == BROADCASTS else f"{TOPIC}{name}:"
            self._catch_ups[name] = CatchUp(name, log_name, prefix, cursor, until, split)
            self._dirty.set()

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
        if self._recatch:
            self._recatch = False
            await self.prepare()
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
        for catch_up in list(self._catch_ups.values()):
            if catch_up.done or (room := self.window - len(self._in_flight)) <= 0:
                continue
            wanted = min(room, _READ_CHUNK)
            entries = await self._logs.since(catch_up.log, catch_up.cursor, wanted)
            catch_up.done = len(entries) < wanted
            for entry in entries:
                if _after(entry.stream_id, catch_up.until):
                    catch_up.done = True
                    break
                catch_up.cursor = entry.stream_id
                if catch_up.wants(entry):
                    self._push(entry, catch_up.prefix, 0)
            if not catch_up.done:
                self._dirty.set()

    async def _deliver(self, entries: list[Entry], redeliveries: int) -> None:
        now_ms = time.time_ns() // 1_000_000
        expired = [e for e in entries if e.expires_ms and e.expires_ms <= now_ms]
        if expired:
            await self._mailboxes.dead_letter(self._session.agent_id, expired, "ttl expired")
        live = [e for e in entries if not (e.expires_ms and e.expires_ms <= now_ms)]
        malformed = [e for e in live if not well_formed(e)]
        if malformed:
            agent_id = self._session.agent_id
            log.warning(
                "%d malformed entries in %s's mailbox dead-lettered", len(malformed), agent_id
            )
            await self._mailboxes.dead_letter(agent_id, malformed, "malformed")
        for entry in live:
            if not malformed or entry not in malformed:
                self._push(entry, MAILBOX, redeliveries)

    def _push(self, entry: Entry, prefix: str, redeliveries: int) -> None:
        delivery_id = prefix + entry.stream_id
        self._in_flight.add(delivery_id)
        self._session.push(wire.delivery_event(entry.envelope, delivery_id, redeliveries))

    async def _send_acks(self) -> None:
        acks, self._acks = self._acks, []
        if acks:
            try:
                await self._mailboxes.ack(self._session.agent_id, acks)
            except AgentpostError:
                self._acks[:0] = acks
                raise
        positions, self._positions = self._positions, {}
        for name, log_id in positions.items():
            self._logs.advance(self._session.agent_id, name, log_id).add_done_callback(_log_error)


def _after(a: str, b: str) -> bool:
    """Stream id `a` is later than `b`."""
    a_ms, _, a_seq = a.partition("-")
    b_ms, _, b_seq = b.partition("-")
    return (int(a_ms or 0), int(a_seq or 0)) > (int(b_ms or 0), int(b_seq or 0))


def _log_error(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a log position was not saved: %s", future.exception())
