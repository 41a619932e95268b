"""`WorkflowCalls`: the workflow RPCs (Coordinate, GetWorkflow, ListWorkflows, CancelWorkflow) of
one identity, shared by `Agent` (on its session's channel) and `Client`.

Reads are repeated while the server is unavailable, within `request_timeout`; a cancel is not
(its `ConnectionLostError` means the outcome is unknown). `follow` resumes a dropped Coordinate
stream after the last event seen, so every event comes once, in order.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Sequence
from typing import TypeVar

import grpc

from agentpost import _status
from agentpost._caller import Caller, closed_error, drain
from agentpost.errors import (
    AgentpostError,
    ConnectionLostError,
    InvalidArgumentError,
    UnavailableError,
)
from agentpost.v1 import workflows_pb2
from agentpost.workflow_run import WorkflowEvent, WorkflowInfo, WorkflowRunState, run_state_to_proto

__all__ = ["MAX_LIST", "WorkflowCalls", "check_run_id"]

#: The most runs one list call returns.
MAX_LIST = 1000

T = TypeVar("T")
logger = logging.getLogger(__name__)


class WorkflowCalls:
    """See the module docstring."""

    def __init__(self, caller: Caller) -> None:
        self.caller = caller

    async def get(self, run_id: str) -> WorkflowInfo:
        caller = self.caller
        request = workflows_pb2.GetWorkflowRequest(run_id=check_run_id(run_id))
        stub = caller.stub
        response = await _served(
            caller.call_retrying(
                lambda timeout: stub.GetWorkflow(request, timeout=timeout, metadata=caller.metadata)
            )
        )
        return WorkflowInfo.from_proto(response.run)

    async def list_runs(
        self, *, states: Sequence[WorkflowRunState | str] = (), limit: int = 100
    ) -> list[WorkflowInfo]:
        if type(limit) is not int or not 1 <= limit <= MAX_LIST:
            raise InvalidArgumentError(
                f"limit must be between 1 and {MAX_LIST}", metadata={"field": "limit"}
            )
        request = workflows_pb2.ListWorkflowsRequest(
            states=check_states(states),  # type: ignore[arg-type]
            limit=limit,
        )
        caller = self.caller
        stub = caller.stub
        response = await _served(
            caller.call_retrying(
                lambda timeout: stub.ListWorkflows(
                    request, timeout=timeout, metadata=caller.metadata
                )
            )
        )
        return [WorkflowInfo.from_proto(run) for run in response.runs]

    async def cancel(self, run_id: str, reason: str = "") -> WorkflowInfo:
        if not isinstance(reason, str):
            raise InvalidArgumentError("reason must be a string", metadata={"field": "reason"})
        caller = self.caller
        request = workflows_pb2.CancelWorkflowRequest(run_id=check_run_id(run_id), reason=reason)
        stub = caller.stub
        response = await _served(
            caller.once(
                lambda timeout: stub.CancelWorkflow(
                    request, timeout=timeout, metadata=caller.metadata
                )
            )
        )
        return WorkflowInfo.from_proto(response.run)

    async def follow(
        self,
        run_id: str,
        after_seq: int = 0,
        definition: workflows_pb2.WorkflowDefinition | None = None,
    ) -> AsyncGenerator[WorkflowEvent, None]:
        """The run's events after `after_seq`, in order, each once, ending after the terminal
        one (or, for a run that ended at or before `after_seq`, without it).

        With a `definition` (whose run_id is `run_id`), the first stream starts the run, or
        attaches to it if it exists; the definition is sent again until the first event
        arrived (the run then surely exists). A stream that drops (or ends early) is opened
        again after the last event seen, with backoff; after `connect_timeout` of failing
        attempts in a row the last `UnavailableError` is raised. Other errors
        (`InvalidWorkflowError`, `WorkflowNotFoundError`...) are raised at once.
        """
        check_run_id(run_id)
        if type(after_seq) is not int or after_seq < 0:
            raise InvalidArgumentError(
                "after_seq must be a non-negative integer", metadata={"field": "after_seq"}
            )
        caller = self.caller
        options = caller.options
        loop = asyncio.get_running_loop()
        backoff = options.reconnect_initial_backoff
        failing_since: float | None = None
        ended = False  # the run is over: the next stream is opened at once
        while True:
            if definition is not None:
                request = workflows_pb2.CoordinateRequest(
                    definition=definition, after_seq=after_seq
                )
            else:
                request = workflows_pb2.CoordinateRequest(run_id=run_id, after_seq=after_seq)
            try:
                call = caller.stub.Coordinate(request, metadata=caller.metadata)
            except grpc.aio.UsageError:
                raise closed_error() from None
            try:
                while True:
                    response = await call.read()
                    if not isinstance(response, workflows_pb2.CoordinateResponse):
                        break  # the stream ended without the terminal event
                    for proto in response.events:
                        if proto.seq <= after_seq:
                            continue  # seen before the stream was resumed
                        event = WorkflowEvent.from_proto(proto)
                        after_seq = event.seq
                        definition = None  # the run exists: attach by id from now on
                        if event.run_id:
                            run_id = event.run_id
                        failing_since = None
                        backoff = options.reconnect_initial_backoff
                        yield event
                        if event.terminal:
                            await drain(call)
                            return
            except grpc.aio.UsageError:
                raise closed_error() from None
            except grpc.RpcError as exc:
                error = _explained(_status.from_rpc_error(exc))
                if not isinstance(error, UnavailableError):
                    raise error from None
            else:
                # Ended early: a server going away (resume), or the terminal event was at or
                # before `after_seq`. Once the run is over, one more stream brings what is left
                # of its log at once; nothing left: done.
                record = await self._record(run_id) if definition is None else None
                if record is not None and record.state.terminal:
                    if record.last_seq <= after_seq:
                        return
                    if not ended:
                        ended = True
                        continue
                error = ConnectionLostError(f"the stream of workflow run {run_id} ended early")
            finally:
                call.cancel()
            now = loop.time()
            if failing_since is None:
                failing_since = now
            elif now - failing_since >= options.connect_timeout:
                raise error
            logger.info("following workflow run %s again: %s", run_id, error.message)
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, options.reconnect_max_backoff)

    async def _record(self, run_id: str) -> WorkflowInfo | None:
        """The run as the server knows it (None when it cannot be told now)."""
        caller = self.caller
        request = workflows_pb2.GetWorkflowRequest(run_id=run_id)
        stub = caller.stub
        try:
            response = await caller.once(
                lambda timeout: stub.GetWorkflow(request, timeout=timeout, metadata=caller.metadata)
            )
        except UnavailableError:
            return None
        return WorkflowInfo.from_proto(response.run)


def check_states(states: Sequence[WorkflowRunState | str]) -> list[int]:
    """The proto values of a state filter (a single state is accepted too)."""
    if isinstance(states, str):
        states = [states]
    return [run_state_to_proto(state) for state in states]


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not run_id:
        raise InvalidArgumentError(
            "run_id must be a non-empty string", metadata={"field": "run_id"}
        )
    return run_id


async def _served(call: Awaitable[T]) -> T:
    try:
        return await call
    except AgentpostError as exc:
        explained = _explained(exc)
        if explained is exc:
            raise
        raise explained from None


def _explained(error: AgentpostError) -> AgentpostError:
    """A server that does not serve workflows answers UNIMPLEMENTED: say so in words."""
    if error.metadata.get("grpc_code") == "UNIMPLEMENTED":
        return AgentpostError(
            "the server does not run workflows (an older agentpost server?)",
            metadata=error.metadata,
        )
    return error
