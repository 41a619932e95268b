"""The workflow RPCs of the servicer: Coordinate, GetWorkflow, ListWorkflows, CancelWorkflow."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from agentpost.errors import InvalidArgumentError
from agentpost.v1 import workflows_pb2
from agentpost_server.core.workflows.driver import WorkflowService
from agentpost_server.rpc.caller import caller
from agentpost_server.rpc.errors import streaming, unary

Ctx = grpc.aio.ServicerContext[Any, Any]


class WorkflowRpcs:
    _workflows: WorkflowService

    @streaming(workflows_pb2.CoordinateRequest)
    async def Coordinate(
        self, request: workflows_pb2.CoordinateRequest, context: Ctx
    ) -> AsyncIterator[workflows_pb2.CoordinateResponse]:
        who = caller(context)
        definition = request.definition if request.HasField("definition") else None
        async for events in self._workflows.coordinate(
            who.agent_id, who.is_admin, definition, request.run_id, request.after_seq
        ):
            yield workflows_pb2.CoordinateResponse(events=events)

    @unary(workflows_pb2.GetWorkflowRequest)
    async def GetWorkflow(
        self, request: workflows_pb2.GetWorkflowRequest, context: Ctx
    ) -> workflows_pb2.GetWorkflowResponse:
        who = caller(context)
        run = await self._workflows.get(who.agent_id, who.is_admin, request.run_id)
        return workflows_pb2.GetWorkflowResponse(run=run)

    @unary(workflows_pb2.ListWorkflowsRequest)
    async def ListWorkflows(
        self, request: workflows_pb2.ListWorkflowsRequest, context: Ctx
    ) -> workflows_pb2.ListWorkflowsResponse:
        who = caller(context)
        if request.limit < 0:
            raise InvalidArgumentError("limit must not be negative", metadata={"field": "limit"})
        runs = await self._workflows.list_runs(
            who.agent_id, who.is_admin, list(request.states), min(request.limit or 100, 1000)
        )
        return workflows_pb2.ListWorkflowsResponse(runs=runs)

    @unary(workflows_pb2.CancelWorkflowRequest)
    async def CancelWorkflow(
        self, request: workflows_pb2.CancelWorkflowRequest, context: Ctx
    ) -> workflows_pb2.CancelWorkflowResponse:
        who = caller(context)
        run = await self._workflows.cancel(
            who.agent_id, who.is_admin, request.run_id, request.reason
        )
        return workflows_pb2.CancelWorkflowResponse(run=run)
