"""`Client`: the unary calls, for scripts and tools that do not hold a session.

async with agentpost.Client("127.0.0.1:50051", agent_id="script") as client:
    await client.send("coder", {"task": "x"})
    for info in await client.list_agents(presence="online"):
        ...
"""

from __future__ import annotations

from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Literal, TypeVar

import grpc

from agentpost import _status
from agentpost._caller import AGENT_ID_METADATA, Caller
from agentpost._keys import RetryKeys
from agentpost._taskapi import TaskMethods
from agentpost._taskcalls import TaskCalls
from agentpost._workflowapi import WorkflowMethods
from agentpost._workflowcalls import WorkflowCalls
from agentpost.agent import fill_send_options
from agentpost.config import ConnectOptions
from agentpost.errors import InvalidArgumentError, UnavailableError
from agentpost.mailbox import DeadLetter, MailboxInfo
from agentpost.message import AgentInfo, Message, agent_info_from_proto
from agentpost.payload import fill_headers, fill_payload, fill_struct
from agentpost.v1 import agents_pb2, messaging_pb2, messaging_pb2_grpc

__all__ = ["AGENT_ID_METADATA", "Client", "Presence"]

Presence = Literal["all", "online", "offline"]
_PRESENCE = {
    "all": agents_pb2.PRESENCE_FILTER_UNSPECIFIED,
    "online": agents_pb2.PRESENCE_FILTER_ONLINE,
    "offline": agents_pb2.PRESENCE_FILTER_OFFLINE,
}
_REQUEST_MARGIN = 1.0
_MAX_DEAD_LETTERS = 1000
T = TypeVar("T")


class Client(TaskMethods, WorkflowMethods):
    """Unary calls to the server at `target`, as `agent_id` ("anonymous" when not given; with
    `options.token`, the token's agent, and an `agent_id` naming another one is refused).

    Use it as an async context manager, or call `close()`. Every method raises `AgentpostError`s
    only. The channel is opened on first use, inside the running event loop.
    """

    def __init__(
        self, target: str, *, agent_id: str | None = None, options: ConnectOptions | None = None
    ) -> None:
        self.target = target
        self.agent_id = agent_id
        self.options = options or ConnectOptions()
        self._channel: grpc.aio.Channel | None = None
        self._stub: messaging_pb2_grpc.AgentMessagingAsyncStub | None = None
        self._caller = Caller(self._get_stub, agent_id=agent_id, options=self.options)
        self._metadata = self._caller.metadata
        self._tasks = TaskCalls(self._caller)
        self._retry_key = RetryKeys()

    def _get_stub(self) -> messaging_pb2_grpc.AgentMessagingAsyncStub:
        if self._stub is None:
            self._channel = self.options.open_channel(self.target)
            self._stub = messaging_pb2_grpc.AgentMessagingStub(self._channel)
        assert self._stub is not None
        return self._stub

    async def _call(self, call: Awaitable[T]) -> T:
        return await self._caller.call(call)

    async def _call_retrying(self, invoke: Callable[[float], Awaitable[T]]) -> T:
        """Call `invoke(timeout)` again after every `UnavailableError`, within
        `request_timeout` (see `Caller.call_retrying`). Only for idempotent calls."""
        return await self._caller.call_retrying(invoke)

    async def send(
        self,
        to: str,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        ttl: float | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Send a direct message to agent `to` (kept in its mailbox until it acknowledges it);
        the message id.

        Raises `AgentNotFoundError` if no agent `to` is known. `ttl` and `idempotency_key` work
        as in `Agent.send`: while the server is unavailable the send is repeated with the same
        key, within `request_timeout`. Without an `idempotency_key` the SDK makes up a
        short-lived transport-retry key (starting with "~", kept by the server only for its
        retry window, two minutes by default); to retry later yourself, pass your own key,
        which must not start with "~" (a final `UnavailableError` then carries it in
        `metadata["idempotency_key"]`).
        """
        request = messaging_pb2.SendRequest(to=to)
        fill_payload(request.payload, payload, content_type=content_type)
        if headers:
            fill_headers(request.headers, headers)
        fill_send_options(request, ttl, idempotency_key, self._retry_key)
        stub = self._get_stub()
        try:
            response = await self._call_retrying(
                lambda timeout: stub.Send(request, timeout=timeout, metadata=self._metadata)
            )
        except UnavailableError as exc:
            if idempotency_key is not None:  # not the short-lived key: that one is no use later
                exc.metadata.setdefault("idempotency_key", idempotency_key)
            raise
        return response.message_id

    async def publish(
        self,
        topic: str,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        include_self: bool = False,
        content_type: str | None = None,
    ) -> str:
        """Publish on `topic` (no wildcards); the message id. Sessions of this client's own
        agent id are skipped unless `include_self`."""
        request = messaging_pb2.PublishRequest(topic=topic, include_self=include_self)
        return await self._publish(request, payload, headers, content_type)

    async def broadcast(
        self,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        include_self: bool = False,
        content_type: str | None = None,
    ) -> str:
        """Send to every connected agent; the message id."""
        request = messaging_pb2.PublishRequest(include_self=include_self)
        request.broadcast.SetInParent()
        return await self._publish(request, payload, headers, content_type)

    async def _publish(
        self,
        request: messaging_pb2.PublishRequest,
        payload: Any,
        headers: Mapping[str, str] | None,
        content_type: str | None,
    ) -> str:
        fill_payload(request.payload, payload, content_type=content_type)
        if headers:
            fill_headers(request.headers, headers)
        stub = self._get_stub()
        call = stub.Publish(request, timeout=self.options.request_timeout, metadata=self._metadata)
        return (await self._call(call)).message_id

    async def request(
        self,
        to: str,
        payload: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the request's own deadline, sent along)
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> Message:
        """Ask agent `to` and wait for the reply (`reply.payload` is the answer).

        Raises `NoResponderError`, `RequestTimeoutError` or `HandlerError` like `Agent.request`.
        """
        if timeout is None:
            timeout = self.options.request_timeout
        if timeout <= 0:
            raise InvalidArgumentError("timeout must be positive", metadata={"field": "timeout"})
        request = messaging_pb2.RequestRequest(to=to)
        fill_payload(request.payload, payload, content_type=content_type)
        if headers:
            fill_headers(request.headers, headers)
        request.timeout.FromNanoseconds(int(timeout * 1e9))
        stub = self._get_stub()
        call = stub.Request(request, timeout=timeout + _REQUEST_MARGIN, metadata=self._metadata)
        reply = (await self._call(call)).reply
        if reply.HasField("error"):
            raise _status.from_error_proto(reply.error)
        return Message.from_envelope(reply)

    async def list_agents(
        self, capability: str | None = None, presence: Presence = "all"
    ) -> list[AgentInfo]:
        """The known agents, sorted by id, optionally filtered by capability and presence."""
        if presence not in _PRESENCE:
            raise InvalidArgumentError(
                f"presence must be one of {sorted(_PRESENCE)}", metadata={"field": "presence"}
            )
        request = messaging_pb2.ListAgentsRequest(
            capability=capability or "", presence=_PRESENCE[presence]
        )
        stub = self._get_stub()
        call = stub.ListAgents(
            request, timeout=self.options.request_timeout, metadata=self._metadata
        )
        return [agent_info_from_proto(info) for info in (await self._call(call)).agents]

    async def get_agent(self, agent_id: str) -> AgentInfo:
        """What the registry knows of one agent; raises `AgentNotFoundError`."""
        request = messaging_pb2.GetAgentRequest(agent_id=agent_id)
        stub = self._get_stub()
        call = stub.GetAgent(request, timeout=self.options.request_timeout, metadata=self._metadata)
        return agent_info_from_proto((await self._call(call)).agent)

    async def register_agent(
        self,
        agent_id: str,
        *,
        capabilities: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> AgentInfo:
        """Make `agent_id` known before it first connects, so that messages sent to it are
        kept in its mailbox; the agent as now known."""
        if isinstance(capabilities, str):
            raise InvalidArgumentError(
                "capabilities is a sequence of strings", metadata={"field": "capabilities"}
            )
        request = messaging_pb2.RegisterAgentRequest(
            agent_id=agent_id, capabilities=list(capabilities)
        )
        if metadata:
            fill_struct(request.metadata, metadata)
        stub = self._get_stub()
        call = stub.RegisterAgent(
            request, timeout=self.options.request_timeout, metadata=self._metadata
        )
        return agent_info_from_proto((await self._call(call)).agent)

    async def get_mailbox(self, agent_id: str) -> MailboxInfo:
        """How many messages wait for `agent_id`, and how old the oldest is."""
        request = messaging_pb2.GetMailboxRequest(agent_id=agent_id)
        stub = self._get_stub()
        call = stub.GetMailbox(
            request, timeout=self.options.request_timeout, metadata=self._metadata
        )
        return MailboxInfo.from_proto(await self._call(call))

    async def list_dead_letters(
        self, agent_id: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        """Messages that expired or were trimmed before delivery (for `agent_id`, or all),
        newest first; at most `limit` (1 to 1000)."""
        if not 1 <= limit <= _MAX_DEAD_LETTERS:
            raise InvalidArgumentError(
                f"limit must be between 1 and {_MAX_DEAD_LETTERS}", metadata={"field": "limit"}
            )
        request = messaging_pb2.ListDeadLettersRequest(agent_id=agent_id or "", limit=limit)
        stub = self._get_stub()
        call = stub.ListDeadLetters(
            request, timeout=self.options.request_timeout, metadata=self._metadata
        )
        response = await self._call(call)
        return [DeadLetter.from_proto(letter) for letter in response.dead_letters]

    async def subscribe(
        self, topics: str | Iterable[str], broadcasts: bool = False
    ) -> AsyncGenerator[Message, None]:
        """Receive messages on these topic patterns (and broadcasts) until the loop is left."""
        patterns = [topics] if isinstance(topics, str) else list(topics)
        request = messaging_pb2.SubscribeRequest(topics=patterns, broadcasts=broadcasts)
        call = self._get_stub().Subscribe(request, metadata=self._metadata)
        try:
            while True:
                response = await call.read()
                if not isinstance(response, messaging_pb2.SubscribeResponse):
                    return
                for envelope in response.messages:
                    yield Message.from_envelope(envelope)
        except grpc.RpcError as exc:
            raise _status.from_rpc_error(exc) from None
        finally:
            call.cancel()

    # ----------------------------------------------------------------- tasks

    # handoff, task_handle, get_task, watch_task, cancel_task, list_tasks, audit: TaskMethods

    def _task_calls(self) -> TaskCalls:
        return self._tasks

    # ----------------------------------------------------------------- workflows
    # coordinate, attach, get_workflow, list_workflows, cancel_workflow: see WorkflowMethods

    def _workflow_calls(self) -> WorkflowCalls:
        return WorkflowCalls(self._caller)

    async def close(self) -> None:
        """Close the channel (idempotent)."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(None)

    async def __aenter__(self) -> Client:
        self._get_stub()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
