"""THE table: exception class <-> ErrorReason <-> gRPC status code, and the conversions built on it.

The server turns a raised `AgentpostError` into a gRPC status with a `google.rpc.ErrorInfo`
(domain "agentpost", reason = the ErrorReason name without its prefix) or into an `Error` frame on
a stream; the SDK turns either back into the same class. Everything is derived from `_TABLE`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from agentpost import errors
from agentpost.v1 import errors_pb2

DOMAIN = "agentpost"
_PREFIX = "ERROR_REASON_"
_DETAILS_KEY = "grpc-status-details-bin"

Reason = errors_pb2.ErrorReason
SC = grpc.StatusCode

_TABLE: tuple[tuple[type[errors.AgentpostError], int, grpc.StatusCode], ...] = (
    (errors.InvalidArgumentError, Reason.ERROR_REASON_INVALID_ARGUMENT, SC.INVALID_ARGUMENT),
    (errors.InvalidAgentIdError, Reason.ERROR_REASON_INVALID_AGENT_ID, SC.INVALID_ARGUMENT),
    (errors.InvalidTopicError, Reason.ERROR_REASON_INVALID_TOPIC, SC.INVALID_ARGUMENT),
    (errors.ProtocolViolationError, Reason.ERROR_REASON_PROTOCOL_VIOLATION, SC.INVALID_ARGUMENT),
    (errors.UnknownRequestError, Reason.ERROR_REASON_UNKNOWN_REQUEST, SC.INVALID_ARGUMENT),
    (errors.AgentNotFoundError, Reason.ERROR_REASON_AGENT_NOT_FOUND, SC.NOT_FOUND),
    (errors.AgentOfflineError, Reason.ERROR_REASON_AGENT_OFFLINE, SC.NOT_FOUND),
    (errors.NoResponderError, Reason.ERROR_REASON_NO_RESPONDER, SC.NOT_FOUND),
    (errors.PayloadTooLargeError, Reason.ERROR_REASON_PAYLOAD_TOO_LARGE, SC.RESOURCE_EXHAUSTED),
    (errors.RequestTimeoutError, Reason.ERROR_REASON_REQUEST_TIMEOUT, SC.DEADLINE_EXCEEDED),
    (errors.HandlerError, Reason.ERROR_REASON_HANDLER_FAILED, SC.UNKNOWN),
    (errors.UnavailableError, Reason.ERROR_REASON_BACKEND_UNAVAILABLE, SC.UNAVAILABLE),
    (errors.ServerShuttingDownError, Reason.ERROR_REASON_SERVER_SHUTTING_DOWN, SC.UNAVAILABLE),
    (errors.ConnectionLostError, Reason.ERROR_REASON_CONNECTION_LOST, SC.UNAVAILABLE),
    (errors.InternalError, Reason.ERROR_REASON_INTERNAL, SC.INTERNAL),
)

_BY_CLASS = {cls: (reason, code) for cls, reason, code in _TABLE}
_BY_REASON = {reason: cls for cls, reason, _ in _TABLE}
# For a status without ErrorInfo (a proxy, grpc itself): the first (most general) class per code.
_BY_CODE: dict[grpc.StatusCode, type[errors.AgentpostError]] = {}
for _cls, _, _code in _TABLE:
    _BY_CODE.setdefault(_code, _cls)
_BY_CODE_NUMBER = {code.value[0]: cls for code, cls in _BY_CODE.items()}
_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def reason_and_code(exc: errors.AgentpostError) -> tuple[int, grpc.StatusCode]:
    """The ErrorReason and status of an exception (its nearest listed ancestor's)."""
    for cls in type(exc).__mro__:
        found = _BY_CLASS.get(cls)  # type: ignore[call-overload]
        if found is not None:
            return found  # type: ignore[no-any-return]
    return Reason.ERROR_REASON_INTERNAL, SC.INTERNAL


def reason_name(reason: int) -> str:
    """`ERROR_REASON_AGENT_OFFLINE` -> `AGENT_OFFLINE` (the form sent in ErrorInfo.reason)."""
    return Reason.Name(reason).removeprefix(_PREFIX)  # type: ignore[arg-type]


def to_error_proto(exc: errors.AgentpostError) -> errors_pb2.Error:
    """The `Error` frame for a stream or a reply."""
    reason, code = reason_and_code(exc)
    return errors_pb2.Error(
        code=code.value[0], reason=reason, message=exc.message, metadata=exc.metadata  # type: ignore[arg-type]
    )


def from_error_proto(error: errors_pb2.Error) -> errors.AgentpostError:
    """The exception an `Error` frame stands for."""
    cls = _BY_REASON.get(error.reason) or _BY_CODE_NUMBER.get(error.code, errors.AgentpostError)
    return cls(error.message or "unknown error", metadata=dict(error.metadata))


def to_status(exc: errors.AgentpostError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """Code, details and trailing metadata (with `google.rpc.Status` + ErrorInfo) for a unary abort."""
    reason, code = reason_and_code(exc)
    info = error_details_pb2.ErrorInfo(
        reason=reason_name(reason), domain=DOMAIN, metadata=exc.metadata
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=exc.message, details=[detail])
    return code, exc.message, ((_DETAILS_KEY, status.SerializeToString()),)


def from_rpc_error(err: grpc.RpcError) -> errors.AgentpostError:
    """The agentpost exception for a failed call (never lets a raw grpc error out)."""
    code: grpc.StatusCode | None = err.code() if hasattr(err, "code") else None  # type: ignore[attr-defined]
    details: str = (err.details() if hasattr(err, "details") else None) or ""  # type: ignore[attr-defined]
    trailing: Any = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None  # type: ignore[attr-defined]
    info = _error_info(trailing or ())
    if info is not None:
        reason = _reason_from_name(info.reason)
        cls = _BY_REASON.get(reason) if reason is not None else None
        if cls is not None:
            return cls(details or info.reason, metadata=dict(info.metadata))
    if code is None:
        return errors.ConnectionLostError(details or "the call failed")
    if code == SC.UNAVAILABLE:
        return errors.ConnectionLostError(details or "the server is unreachable")
    if code == SC.DEADLINE_EXCEEDED:
        return errors.RequestTimeoutError(details or "deadline exceeded")
    if code == SC.CANCELLED:
        return errors.ConnectionLostError(details or "the call was cancelled")
    cls = _BY_CODE.get(code, errors.AgentpostError)
    return cls(details or code.name.lower().replace("_", " "), metadata={"grpc_code": code.name})


def code_from_number(number: int) -> grpc.StatusCode:
    """`grpc.StatusCode` for a `google.rpc.Code` number."""
    return _CODE_BY_NUMBER.get(number, SC.UNKNOWN)


def _reason_from_name(name: str) -> int | None:
    try:
        return Reason.Value(name if name.startswith(_PREFIX) else _PREFIX + name)
    except ValueError:
        return None


def _error_info(trailing: Any) -> error_details_pb2.ErrorInfo | None:
    pairs: Mapping[str, Any] | Any = trailing
    for key, value in pairs:
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == DOMAIN:
                return info
    return None
