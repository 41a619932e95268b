"""agentpost: a gRPC message bus for AI agents.

    import agentpost

    async with agentpost.connect("127.0.0.1:50051", agent_id="planner") as agent:
        await agent.send("coder", {"task": "x"})
        reply = await agent.request("coder", {"q": 1}, timeout=5.0)

`connect()` opens an agent's session (`Agent`); `Client` makes unary calls without one. Tasks
are handed off with `handoff()` (a `TaskHandle` follows them) and taken on with `tasks()` or a
task handler (`Assignment`). Workflows run with `coordinate()` (a `RunHandle` follows them).
Every error is an `AgentpostError` (see `agentpost.errors` for the tree).
"""

from agentpost.agent import Agent, AgentConnector, RequestHandler, TaskHandler, connect
from agentpost.assignment import Assignment
from agentpost.audit import AuditRecord
from agentpost.client import Client, Presence
from agentpost.config import AckMode, ConnectOptions
from agentpost.errors import (
    AgentNotFoundError,
    AgentOfflineError,
    AgentpostError,
    ConnectionLostError,
    HandlerError,
    InternalError,
    InvalidAgentIdError,
    InvalidArgumentError,
    InvalidTopicError,
    InvalidWorkflowError,
    LimitExceededError,
    NoResponderError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ProtocolViolationError,
    RateLimitedError,
    RequestTimeoutError,
    ServerShuttingDownError,
    SlowConsumerError,
    TaskNotFoundError,
    TaskStateError,
    UnauthenticatedError,
    UnavailableError,
    UnknownRequestError,
    WorkflowNotFoundError,
    WorkflowStateError,
)
from agentpost.handle import TaskHandle
from agentpost.mailbox import DeadLetter, MailboxInfo
from agentpost.message import AgentInfo, Message, MessageKind
from agentpost.run_handle import RunHandle
from agentpost.tasks import TaskEvent, TaskEventKind, TaskFailedError, TaskInfo, TaskState
from agentpost.workflow_run import (
    WorkflowEvent,
    WorkflowEventKind,
    WorkflowFailedError,
    WorkflowInfo,
    WorkflowRunState,
    WorkflowStepInfo,
    WorkflowStepState,
)

__version__ = "0.1.0"

__all__ = [
    "AckMode",
    "Agent",
    "AgentConnector",
    "AgentInfo",
    "AgentNotFoundError",
    "AgentOfflineError",
    "AgentpostError",
    "Assignment",
    "AuditRecord",
    "Client",
    "ConnectOptions",
    "ConnectionLostError",
    "DeadLetter",
    "HandlerError",
    "InternalError",
    "InvalidAgentIdError",
    "InvalidArgumentError",
    "InvalidTopicError",
    "InvalidWorkflowError",
    "LimitExceededError",
    "MailboxInfo",
    "Message",
    "MessageKind",
    "NoResponderError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Presence",
    "ProtocolViolationError",
    "RateLimitedError",
    "RequestHandler",
    "RequestTimeoutError",
    "RunHandle",
    "ServerShuttingDownError",
    "SlowConsumerError",
    "TaskEvent",
    "TaskEventKind",
    "TaskFailedError",
    "TaskHandle",
    "TaskHandler",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskState",
    "TaskStateError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnknownRequestError",
    "WorkflowEvent",
    "WorkflowEventKind",
    "WorkflowFailedError",
    "WorkflowInfo",
    "WorkflowNotFoundError",
    "WorkflowRunState",
    "WorkflowStateError",
    "WorkflowStepInfo",
    "WorkflowStepState",
    "__version__",
    "connect",
]
