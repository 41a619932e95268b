"""THE table: exception class <-> ErrorReason <-> gRPC status code, and the conversions built on it.

The server turns a raised `AgentpostError` into a gRPC status with a `google.rpc.ErrorInfo`
(domain "agentpost", reason = the ErrorReason name without its prefix) or into an `Error` frame on
a stream; the SDK turns either back into the same class. Everything is derived from `_TABLE`.

Codes are `google.rpc.Code` numbers, so the table and the `Error` conversions import no grpc (the
server's core uses them); only `to_status` and `from_rpc_error` touch grpc, importing it lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped, unused-ignore]

from agentpost import errors
from agentpost.v1 import errors_pb2

if TYPE_CHECKING:
    import grpc

# (googleapis-common-protos ships .pyi files but no py.typed marker, so mypy skips google.rpc.)

DOMAIN = "agentpost"
_PREFIX = "ERROR_REASON_"
_DETAILS_KEY = "grpc-status-details-bin"

Reason = errors_pb2.ErrorReason
C = code_pb2

_TABLE: tuple[tuple[type[errors.AgentpostError], int, int], ...] = (
    (errors.InvalidArgumentError, Reason.ERROR_REASON_INVALID_ARGUMENT, C.INVALID_ARGUMENT),
    (errors.InvalidAgentIdError, Reason.ERROR_REASON_INVALID_AGENT_ID, C.INVALID_ARGUMENT),
    (errors.InvalidTopicError, Reason.ERROR_REASON_INVALID_TOPIC, C.INVALID_ARGUMENT),
    (errors.ProtocolViolationError, Reason.ERROR_REASON_PROTOCOL_VIOLATION, C.INVALID_ARGUMENT),
    (errors.UnknownRequestError, Reason.ERROR_REASON_UNKNOWN_REQUEST, C.INVALID_ARGUMENT),
    (errors.InvalidWorkflowError, Reason.ERROR_REASON_INVALID_WORKFLOW, C.INVALID_ARGUMENT),
    (errors.UnauthenticatedError, Reason.ERROR_REASON_UNAUTHENTICATED, C.UNAUTHENTICATED),
    (errors.PermissionDeniedError, Reason.ERROR_REASON_PERMISSION_DENIED, C.PERMISSION_DENIED),
    (errors.AgentNotFoundError, Reason.ERROR_REASON_AGENT_NOT_FOUND, C.NOT_FOUND),
    (errors.TaskNotFoundError, Reason.ERROR_REASON_TASK_NOT_FOUND, C.NOT_FOUND),
    (errors.WorkflowNotFoundError, Reason.ERROR_REASON_WORKFLOW_NOT_FOUND, C.NOT_FOUND),
    (errors.TaskStateError, Reason.ERROR_REASON_TASK_STATE_CONFLICT, C.FAILED_PRECONDITION),
    (
        errors.WorkflowStateError,
        Reason.ERROR_REASON_WORKFLOW_STATE_CONFLICT,
        C.FAILED_PRECONDITION,
    ),
    (errors.AgentOfflineError, Reason.ERROR_REASON_AGENT_OFFLINE, C.NOT_FOUND),
    (errors.NoResponderError, Reason.ERROR_REASON_NO_RESPONDER, C.NOT_FOUND),
    (errors.PayloadTooLargeError, Reason.ERROR_REASON_PAYLOAD_TOO_LARGE, C.RESOURCE_EXHAUSTED),
    (errors.SlowConsumerError, Reason.ERROR_REASON_SLOW_CONSUMER, C.RESOURCE_EXHAUSTED),
    (errors.RateLimitedError, Reason.ERROR_REASON_RATE_LIMITED, C.RESOURCE_EXHAUSTED),
    (errors.LimitExceededError, Reason.ERROR_REASON_LIMIT_EXCEEDED, C.RESOURCE_EXHAUSTED),
    (errors.RequestTimeoutError, Reason.ERROR_REASON_REQUEST_TIMEOUT, C.DEADLINE_EXCEEDED),
    (errors.HandlerError, Reason.ERROR_REASON_HANDLER_FAILED, C.UNKNOWN),
    (errors.UnavailableError, Reason.ERROR_REASON_BACKEND_UNAVAILABLE, C.UNAVAILABLE),
    (errors.ServerShuttingDownError, Reason.ERROR_REASON_SERVER_SHUTTING_DOWN, C.UNAVAILABLE),
    (errors.ConnectionLostError, Reason.ERROR_REASON_CONNECTION_LOST, C.UNAVAILABLE),
    (errors.InternalError, Reason.ERROR_REASON_INTERNAL, C.INTERNAL),
)

_BY_CLASS: dict[type[errors.AgentpostError], tuple[int, int]] = {
    cls: (reason, code) for cls, reason, code in _TABLE
}
_BY_REASON: dict[int, type[errors.AgentpostError]] = {reason: cls for cls, reason, _ in _TABLE}
# For a status without ErrorInfo (a proxy, grpc itself): the first (most general) class per code.
_BY_CODE: dict[int, type[errors.AgentpostError]] = {}
for _cls, _, _code in _TABLE:
    _BY_CODE.setdefault(_code, _cls)


def reason_and_code(exc: errors.AgentpostError) -> tuple[int, int]:
    """The ErrorReason and `google.rpc.Code` of an exception (its nearest listed ancestor's)."""
    for cls in type(exc).__mro__:
        found = _BY_CLASS.get(cls)
        if found is not None:
            return found
    return Reason.ERROR_REASON_INTERNAL, C.INTERNAL


def reason_name(reason: int) -> str:
    """`ERROR_REASON_AGENT_OFFLINE` -> `AGENT_OFFLINE` (the form sent in ErrorInfo.reason)."""
    return Reason.Name(reason).removeprefix(_PREFIX)  # type: ignore[arg-type]


def to_error_proto(exc: errors.AgentpostError) -> errors_pb2.Error:
    """The `Error` frame for a stream or a reply."""
    reason, code = reason_and_code(exc)
    return errors_pb2.Error(
        code=code,
        reason=reason,  # type: ignore[arg-type]
        message=exc.message,
        metadata=exc.metadata,
    )


def from_error_proto(error: errors_pb2.Error) -> errors.AgentpostError:
    """The exception an `Error` frame stands for."""
    cls = _BY_REASON.get(error.reason) or _BY_CODE.get(error.code, errors.AgentpostError)
    return cls(error.message or "unknown error", metadata=dict(error.metadata))


def to_status(
    exc: errors.AgentpostError,
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """Code, details and trailing metadata (with `google.rpc.Status` + ErrorInfo) for an abort."""
    reason, code = reason_and_code(exc)
    info = error_details_pb2.ErrorInfo(
        reason=reason_name(reason), domain=DOMAIN, metadata=exc.metadata
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code, message=exc.message, details=[detail])
    return _grpc_code(code), exc.message, ((_DETAILS_KEY, status.SerializeToString()),)


def from_rpc_error(err: grpc.RpcError) -> errors.AgentpostError:
    """The agentpost exception for a failed call (never lets a raw grpc error out)."""
    code_obj: Any = err.code() if hasattr(err, "code") else None
    details: str = (err.details() if hasattr(err, "details") else None) or ""
    trailing: Any = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    info = _error_info(trailing or ())
    if info is not None:
        cls = _BY_REASON.get(_reason_from_name(info.reason) or -1)
        if cls is not None:
            return cls(details or info.reason, metadata=dict(info.metadata))
    code = code_obj.value[0] if code_obj is not None else C.UNAVAILABLE
    if code in (C.UNAVAILABLE, C.CANCELLED):
        return errors.ConnectionLostError(details or "the server is unreachable")
    if code == C.DEADLINE_EXCEEDED:
        return errors.RequestTimeoutError(details or "deadline exceeded")
    cls = _BY_CODE.get(code, errors.AgentpostError)
    name = code_obj.name if code_obj is not None else "UNKNOWN"
    return cls(details or name.lower().replace("_", " "), metadata={"grpc_code": name})


def _grpc_code(number: int) -> grpc.StatusCode:
    import grpc

    for status_code in grpc.StatusCode:
        if status_code.value[0] == number:
            return status_code
    return grpc.StatusCode.UNKNOWN


def _reason_from_name(name: str) -> int | None:
    try:
        return Reason.Value(name if name.startswith(_PREFIX) else _PREFIX + name)
    except ValueError:
        return None


def _error_info(trailing: Any) -> error_details_pb2.ErrorInfo | None:
    for key, value in trailing:
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == DOMAIN:
                return info
    return None
