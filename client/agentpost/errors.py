"""The exceptions of agentpost, shared by the server (which raises them) and the SDK (which catches
them again on the other side of the wire).

    AgentpostError                      reason            gRPC status
    ├── InvalidArgumentError            INVALID_ARGUMENT  INVALID_ARGUMENT
    │   ├── InvalidAgentIdError         INVALID_AGENT_ID  INVALID_ARGUMENT
    │   ├── InvalidTopicError           INVALID_TOPIC     INVALID_ARGUMENT
    │   ├── ProtocolViolationError      PROTOCOL_VIOLATION INVALID_ARGUMENT
    │   ├── UnknownRequestError         UNKNOWN_REQUEST   INVALID_ARGUMENT
    │   └── InvalidWorkflowError        INVALID_WORKFLOW  INVALID_ARGUMENT
    ├── UnauthenticatedError            UNAUTHENTICATED   UNAUTHENTICATED
    ├── PermissionDeniedError           PERMISSION_DENIED PERMISSION_DENIED
    ├── AgentNotFoundError              AGENT_NOT_FOUND   NOT_FOUND
    ├── TaskNotFoundError               TASK_NOT_FOUND    NOT_FOUND
    ├── WorkflowNotFoundError           WORKFLOW_NOT_FOUND NOT_FOUND
    ├── TaskStateError                  TASK_STATE_CONFLICT FAILED_PRECONDITION
    ├── WorkflowStateError              WORKFLOW_STATE_CONFLICT FAILED_PRECONDITION
    ├── AgentOfflineError               AGENT_OFFLINE     NOT_FOUND
    │   └── NoResponderError            NO_RESPONDER      NOT_FOUND
    ├── PayloadTooLargeError            PAYLOAD_TOO_LARGE RESOURCE_EXHAUSTED
    ├── SlowConsumerError               SLOW_CONSUMER     RESOURCE_EXHAUSTED
    ├── RateLimitedError                RATE_LIMITED      RESOURCE_EXHAUSTED
    ├── LimitExceededError              LIMIT_EXCEEDED    RESOURCE_EXHAUSTED
    ├── RequestTimeoutError             REQUEST_TIMEOUT   DEADLINE_EXCEEDED  (also a TimeoutError)
    ├── HandlerError                    HANDLER_FAILED    UNKNOWN
    ├── UnavailableError                BACKEND_UNAVAILABLE UNAVAILABLE
    │   ├── ServerShuttingDownError     SERVER_SHUTTING_DOWN UNAVAILABLE
    │   └── ConnectionLostError         CONNECTION_LOST   UNAVAILABLE
    └── InternalError                   INTERNAL          INTERNAL

`agentpost._status` holds the one table that ties each class to its reason and status.

One more `AgentpostError` never travels on the wire, so it is not in that table:
`agentpost.tasks.TaskFailedError`, raised by `TaskHandle.result()` for a task that ended without
a result (failed, rejected, canceled, expired). Likewise
`agentpost.workflow_run.WorkflowFailedError`, raised by `RunHandle.result()` for a workflow run
that failed or was canceled.
"""

from __future__ import annotations

from collections.abc import Mapping


class AgentpostError(Exception):
    """Root of every agentpost error; `metadata` carries machine-readable facts (field, limit)."""

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgumentError(AgentpostError):
    """A field is missing or malformed; `metadata["field"]` names it when known."""


class InvalidAgentIdError(InvalidArgumentError):
    """An agent id breaks the naming rule."""


class InvalidTopicError(InvalidArgumentError):
    """A topic name or pattern breaks the naming rule."""


class ProtocolViolationError(InvalidArgumentError):
    """A Connect stream broke the protocol (for example, it did not start with an introduction)."""


class UnknownRequestError(InvalidArgumentError):
    """A reply names a request that this session is not (or no longer) answering."""


class InvalidWorkflowError(InvalidArgumentError):
    """A workflow definition is invalid; the message says what and where (step, cycle, ref)."""


class UnauthenticatedError(AgentpostError):
    """No credential, or an unknown, expired or malformed one."""


class PermissionDeniedError(AgentpostError):
    """The credential is valid but does not allow this action."""


class TaskNotFoundError(AgentpostError):
    """No task with this id exists (or it is past its retention)."""


class WorkflowNotFoundError(AgentpostError):
    """No workflow run with this id exists."""


class TaskStateError(AgentpostError):
    """The task's state does not allow this action, or the caller is no longer its assignee."""


class WorkflowStateError(AgentpostError):
    """The workflow run's state does not allow this action."""


class AgentNotFoundError(AgentpostError):
    """No agent with this id is known."""


class AgentOfflineError(AgentpostError):
    """The agent has no connected session, so nothing was sent."""


class NoResponderError(AgentOfflineError):
    """A request's target has no connected session to answer it."""


class PayloadTooLargeError(AgentpostError):
    """The payload is larger than the server's limit (`metadata["limit_bytes"]`)."""


class SlowConsumerError(AgentpostError):
    """The session fell too far behind reading its deliveries and the server closed it."""


class RateLimitedError(AgentpostError):
    """The agent's rate limit is used up; `retry_after` (seconds) says when to try again."""

    @property
    def retry_after(self) -> float:
        return int(self.metadata.get("retry_after_ms", "0") or 0) / 1000


class LimitExceededError(AgentpostError):
    """A configured limit was hit; `metadata["limit"]` names it, `metadata["max"]` its value."""


class RequestTimeoutError(AgentpostError, TimeoutError):
    """No reply arrived before the request's timeout."""


class HandlerError(AgentpostError):
    """The responder's handler failed; the message is the responder's own text."""


class UnavailableError(AgentpostError):
    """The server cannot do this right now (its storage is unreachable); retrying later may work."""


class ServerShuttingDownError(UnavailableError):
    """The server is shutting down; reconnect, preferably elsewhere."""


class ConnectionLostError(UnavailableError):
    """The connection to the server broke before the answer arrived; the outcome is unknown."""


class InternalError(AgentpostError):
    """A bug on the server; its log has the details."""
