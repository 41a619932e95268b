"""The session's account of deliveries: which messages the application has been shown, which of
them still need an acknowledgement, and the delivery ids waiting to be sent in an `Acknowledge`.

The server delivers at least once: a delivery that is not acknowledged comes again after a
reconnect or the server's ack timeout, possibly with a new delivery id. The ledger turns that
into exactly once for the application, by message (envelope) id:

* a message seen for the first time is shown;
* a message still held by the application (shown, not yet acknowledged) is not shown again; the
  new delivery id is acknowledged together with the first one;
* a message already handled (acknowledged, or shown without needing an ack) is not shown again,
  and the new delivery id is acknowledged at once.

"Handled" is a bounded, insertion-ordered memory (the oldest ids are forgotten first). The ids of
acknowledged deliveries are also what `StateFile` keeps across restarts (`recent_acked`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["ACKS_PER_OPERATION", "Ledger"]

#: The most delivery ids one `Acknowledge` carries (the rest go in the next frame).
ACKS_PER_OPERATION = 10_000


class Ledger:
    """See the module docstring. Not thread-safe: used from the session's event loop only."""

    def __init__(self, capacity: int, *, keep: int, handled: Iterable[str] = ()) -> None:
        self._capacity = capacity
        self._keep = keep
        #: Message ids shown and done with, oldest first.
        self._handled: OrderedDict[str, None] = OrderedDict()
        #: The newest acknowledged message ids, for the state file.
        self._acked: OrderedDict[str, None] = OrderedDict()
        #: Message id -> the delivery ids to acknowledge with it, for messages shown and held.
        self._held: dict[str, list[str]] = {}
        self._pending: list[str] = []
        #: Bumped whenever `recent_acked()` changes.
        self.version = 0
        for message_id in handled:
            self._remember(message_id, acked=True)

    # ----------------------------------------------------------------- deliveries

    def admit(self, message_id: str, delivery_id: str) -> bool:
        """Whether to show a delivered message; a duplicate's delivery id is accounted for."""
        if message_id in self._handled:
            if delivery_id:
                self._pending.append(delivery_id)
            return False
        held = self._held.get(message_id)
        if held is not None:
            if delivery_id:
                held.append(delivery_id)
            return False
        if delivery_id:
            self._held[message_id] = [delivery_id]
        else:
            self._remember(message_id, acked=False)  # nothing to acknowledge: handled as shown
        return True

    def ack(self, message_id: str) -> bool:
        """The application is done with a held message: queue its delivery ids. False if it was
        not held (never needed an ack, or acknowledged already)."""
        delivery_ids = self._held.pop(message_id, None)
        if delivery_ids is None:
            return False
        self._pending.extend(delivery_ids)
        self._remember(message_id, acked=True)
        return True

    def forget(self, message_id: str) -> None:
        """The application gave up on a held message: show it again if it is delivered again."""
        self._held.pop(message_id, None)

    def is_held(self, message_id: str) -> bool:
        return message_id in self._held

    # ----------------------------------------------------------------- acknowledgements

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def take_pending(self) -> list[str]:
        """The delivery ids to send now (at most `ACKS_PER_OPERATION`), oldest first."""
        if len(self._pending) <= ACKS_PER_OPERATION:
            taken, self._pending = self._pending, []
        else:
            taken = self._pending[:ACKS_PER_OPERATION]
            del self._pending[:ACKS_PER_OPERATION]
        return taken

    # ----------------------------------------------------------------- memory

    def recent_acked(self) -> list[str]:
        """The newest acknowledged message ids (at most `keep`), oldest first."""
        return list(self._acked)

    def _remember(self, message_id: str, *, acked: bool) -> None:
        handled = self._handled
        handled[message_id] = None
        handled.move_to_end(message_id)
        if len(handled) > self._capacity:
            handled.popitem(last=False)
        if acked and self._keep:
            kept = self._acked
            kept[message_id] = None
            kept.move_to_end(message_id)
            if len(kept) > self._keep:
                kept.popitem(last=False)
            self.version += 1
