"""Registers the servicer with raw-bytes request decoding, so that a malformed frame becomes a
clear INVALID_ARGUMENT from the servicer instead of grpc's generic INTERNAL."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from agentpost.errors import InvalidArgumentError
from agentpost.v1 import messaging_pb2

SERVICE = messaging_pb2.DESCRIPTOR.services_by_name["AgentMessaging"]


def decode(message_type: type[Message], raw: bytes) -> Any:
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise InvalidArgumentError(
            f"the request is not a valid {message_type.DESCRIPTOR.full_name} message"
        ) from None


def _serialize(message: Message | bytes) -> bytes:
    """Responses are messages, or frames already serialized (see `core.wire`)."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(servicer: object, server: grpc.aio.Server) -> None:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in SERVICE.methods:
        impl = getattr(servicer, method.name, None)
        if impl is None:  # not served (yet): grpc answers UNIMPLEMENTED
            continue
        if method.client_streaming and method.server_streaming:
            handler = grpc.stream_stream_rpc_method_handler(impl, None, _serialize)
        elif method.server_streaming:
            handler = grpc.unary_stream_rpc_method_handler(impl, None, _serialize)
        else:
            handler = grpc.unary_unary_rpc_method_handler(impl, None, _serialize)
        handlers[method.name] = handler
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
