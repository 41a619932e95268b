"""agentpost: a gRPC message bus for AI agents.

    import agentpost

    async with agentpost.connect("127.0.0.1:50051", agent_id="planner") as agent:
        await agent.send("coder", {"task": "x"})
        reply = await agent.request("coder", {"q": 1}, timeout=5.0)

`connect()` opens an agent's session (`Agent`); `Client` makes unary calls without one. Every
error is an `AgentpostError` (see `agentpost.errors` for the tree).
"""

from agentpost.agent import Agent, AgentConnector, RequestHandler, connect
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
from agentpost.mailbox import DeadLetter, MailboxInfo
from agentpost.message import AgentInfo, Message, MessageKind

__version__ = "0.1.0"

__all__ = [
    "AckMode",
    "Agent",
    "AgentConnector",
    "AgentInfo",
    "AgentNotFoundError",
    "AgentOfflineError",
    "AgentpostError",
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
    "ServerShuttingDownError",
    "SlowConsumerError",
    "TaskNotFoundError",
    "TaskStateError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnknownRequestError",
    "WorkflowNotFoundError",
    "WorkflowStateError",
    "__version__",
    "connect",
]
