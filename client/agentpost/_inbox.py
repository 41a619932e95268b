"""A session's deliveries on their way to the application: duplicates dropped (the `Ledger`),
the bounded queue that `messages()` reads, and acknowledgements as `ConnectOptions.ack_mode`
says.

* "after_handling": `messages()` holds the message it handed out (`hold`) and is `done` with it
  when asked for the next one or when it is closed, or `release`s it when its task is cancelled;
  `close()` acknowledges whatever is still held, unless the agent is closed by an exception
  (`abort`): then it comes again.
* "on_receipt": acknowledged once it is in the queue (at most once to the application: what is
  still queued when the agent closes is lost).
* "manual": `Message.ack()`.

Acknowledging only queues delivery ids (`take_acks` hands them to the link's writer), so it never
waits, and the reader never waits for it. The queue holds `max_buffered_messages`; keep the
server's window (`max_unacked`) at most that, so that deliveries waiting for an acknowledgement
can never fill it and stop the reader.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from agentpost._ledger import Ledger
from agentpost.config import ConnectOptions
from agentpost.errors import AgentpostError, ConnectionLostError
from agentpost.message import Message
from agentpost.v1 import messaging_pb2

__all__ = ["Inbox"]


class _End:
    """The queue's last item: iteration stops (or raises `error`)."""

    def __init__(self, error: AgentpostError | None) -> None:
        self.error = error


class Inbox:
    """See the module docstring. `acks_due()` is called when delivery ids wait to be sent,
    `handled()` when the set of acknowledged messages changed (for the state file)."""

    def __init__(
        self,
        options: ConnectOptions,
        *,
        acks_due: Callable[[], None],
        handled: Callable[[], None] | None = None,
    ) -> None:
        self.ledger = Ledger(options.dedupe_memory, keep=0)
        self.closed = False
        self._queue: asyncio.Queue[Message | _End] = asyncio.Queue(options.max_buffered_messages)
        self._dedupe_memory = options.dedupe_memory
        self._on_receipt = options.ack_mode == "on_receipt"
        self._held: set[str] = set()
        self._acks_due = acks_due
        self._handled = handled

    def restore(self, handled: Iterable[str], *, keep: int) -> None:
        """Start from the handled ids of an earlier run; keep the newest `keep` for the next."""
        self.ledger = Ledger(self._dedupe_memory, keep=keep, handled=handled)

    # ----------------------------------------------------------------- in

    def admit(self, event: messaging_pb2.ServerEvent) -> bool:
        """Whether a delivery is new (to be shown); a duplicate's delivery id is accounted for.
        A new one with a delivery id is held until `ack` (or `done`)."""
        ledger = self.ledger
        if ledger.admit(event.delivery.id, event.delivery_id):
            return True
        if ledger.has_pending:
            self._acks_due()
        return False

    async def deliver(self, event: messaging_pb2.ServerEvent) -> None:
        """Queue a delivery for the application, unless it is a duplicate (waits while full)."""
        if not self.admit(event):
            return
        envelope, delivery_id = event.delivery, event.delivery_id
        message = Message(  # what from_envelope() does, one call less
            envelope, delivery_id=delivery_id, redeliveries=event.redeliveries, acker=self.ack
        )
        await self.put(message)
        if self._on_receipt and delivery_id and not self.closed:
            self._acknowledge(message.id)

    async def put(self, message: Message) -> None:
        """Queue a message as it is (a request for `messages()`); waits while the queue is full."""
        if self._queue.full():
            await self._queue.put(message)
        else:
            self._queue.put_nowait(message)

    def end(self, error: AgentpostError | None) -> None:
        """No more messages: drop what nobody read, and make `next()` raise `error` (or end)."""
        queue = self._queue
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(_End(error))

    # ----------------------------------------------------------------- out

    async def next(self) -> Message | None:
        """The next message; `None` once closed; raises the error the inbox `end`ed with."""
        if self.closed:
            return None
        queue = self._queue
        item = queue.get_nowait() if not queue.empty() else await queue.get()
        if not isinstance(item, _End):
            return item
        if not queue.full():
            queue.put_nowait(item)  # for the other readers, and the next messages() call
        if item.error is not None:
            raise _copy(item.error)
        return None

    def hold(self, message_id: str) -> None:
        """`messages()` handed this message out; it acknowledges it later (`done`)."""
        self._held.add(message_id)

    def done(self, message_id: str) -> None:
        """`messages()` is done with a held message: acknowledge it (not once closed)."""
        self._held.discard(message_id)
        if not self.closed:
            self._acknowledge(message_id)

    def release(self, message_id: str) -> None:
        """`messages()` was interrupted while the application handled this message: do not
        acknowledge it, and show it again if it is delivered again."""
        self._held.discard(message_id)
        self.ledger.forget(message_id)

    def ack(self, message_id: str) -> None:
        """`Message.ack()`: no-op unless the message waits for an acknowledgement."""
        if not self.ledger.is_held(message_id):
            return
        if self.closed:
            raise ConnectionLostError(
                f"the agent is closed; message {message_id} will be delivered again"
            )
        self._held.discard(message_id)
        self._acknowledge(message_id)

    def close(self, *, abort: bool) -> None:
        """No more acknowledgements, after those of the held messages unless `abort`."""
        if self.closed:
            return
        self.closed = True
        held, self._held = self._held, set()
        if not abort:
            for message_id in held:
                self._acknowledge(message_id)

    def take_acks(self) -> list[str] | None:
        """The delivery ids to send now, or None."""
        return self.ledger.take_pending() if self.ledger.has_pending else None

    def _acknowledge(self, message_id: str) -> None:
        if self.ledger.ack(message_id):
            self._acks_due()
            if self._handled is not None:
                self._handled()


def _copy(error: AgentpostError) -> AgentpostError:
    return type(error)(error.message, metadata=error.metadata)
