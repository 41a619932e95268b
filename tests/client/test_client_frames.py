"""The pre-serialized framing of Connect operations, and the writer's batching arithmetic."""

from __future__ import annotations

import pytest

from agentpost import _link
from agentpost.session import handler_error
from agentpost.v1 import errors_pb2, messaging_pb2


def _op(size: int, op_id: str = "1") -> messaging_pb2.ClientOperation:
    op = messaging_pb2.ClientOperation(operation_id=op_id)
    op.send.to = "coder"
    op.send.payload.data = b"x" * size
    return op


@pytest.mark.parametrize("size", [0, 10, 100, 127, 128, 300, 16_383, 16_384, 70_000, 3_000_000])
def test_joined_pieces_are_a_valid_connect_request(size: int) -> None:
    ops = [_op(size, "1"), _op(5, "2"), _op(size, "3")]
    joined = b"".join(_link.frame_piece(op.SerializeToString()) for op in ops)
    assert joined == messaging_pb2.ConnectRequest(operations=ops).SerializeToString()
    assert list(messaging_pb2.ConnectRequest.FromString(joined).operations) == ops


def test_keep_alive_piece() -> None:
    frame = messaging_pb2.ConnectRequest.FromString(_link._KEEP_ALIVE)
    assert [op.WhichOneof("operation") for op in frame.operations] == ["keep_alive"]


async def test_take_splits_a_backlog_by_size() -> None:
    link = _link.Link.__new__(_link.Link)
    link._pieces = [b"a" * 400, b"b" * 400, b"c" * 400, b"d" * 2000]
    link._queued_bytes = 3200
    assert link._take(1000) == [b"a" * 400, b"b" * 400]
    assert link._take(1000) == [b"c" * 400]
    assert link._take(1000) == [b"d" * 2000]  # too big alone: still sent, alone
    assert link._pieces == []
    assert link._queued_bytes == 0


def test_handler_error_names_the_exception_type() -> None:
    error = handler_error(ValueError("bad input"))
    assert error.code == 2  # UNKNOWN
    assert error.reason == errors_pb2.ERROR_REASON_HANDLER_FAILED
    assert error.message == "ValueError: bad input"
    assert len(handler_error(RuntimeError("x" * 10_000)).message) <= 2048
