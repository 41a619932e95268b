"""Hand-made protobuf wire encoding for the hottest frames: a mailbox delivery is framed around
the stored envelope bytes as they are, never parsed and serialized again. Protobuf guarantees
that these bytes decode exactly like the messages built field by field."""

from __future__ import annotations


def varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, data: bytes) -> bytes:
    """`data` as length-delimited field `number` of an enclosing message."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def delivery_event(envelope: bytes, delivery_id: str, redeliveries: int) -> bytes:
    """A ServerEvent: delivery (field 5) = envelope, delivery_id (9), redeliveries (10)."""
    ident = delivery_id.encode()
    parts = [b"\x2a", varint(len(envelope)), envelope, b"\x4a", varint(len(ident)), ident]
    if redeliveries:
        parts += [b"\x50", varint(redeliveries)]
    return b"".join(parts)


def connect_response(events: list[bytes]) -> bytes:
    """A ConnectResponse whose `events` (field 1) are the given serialized ServerEvents."""
    parts: list[bytes] = []
    for event in events:
        parts += [b"\x0a", varint(len(event)), event]
    return b"".join(parts)
