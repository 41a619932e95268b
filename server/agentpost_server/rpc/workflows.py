"""The workflow RPCs of the servicer: Coordinate, GetWorkflow, ListWorkflows, CancelWorkflow."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from agentpost.errors import InvalidArgumentError
from agentpost.v1 import workflows_pb2
from agentpost_server.core.workflows.driver import WorkflowService
from agentpost_server.rpc.auth import CallAuth, caller
from agentpost_server.rpc.errors import streaming, unary
from agentpost_server.rpc.tasks import admin, audited

Ctx = grpc.aio.ServicerContext[Any, Any]


class WorkflowRpcs:
    call_auth: CallAuth
    _workflows: WorkflowService

    @streaming(workflows_pb2.CoordinateRequest)
    async def Coordinate(
        self, request: workflows_pb2.CoordinateRequest, context: Ctx
    ) -> AsyncIterator[workflows_pb2.CoordinateResponse]:
        who = caller(context)
        definition = request.definition if request.HasField("definition") else None
        subject = request.run_id or (definition.run_id if definition is not None else "")
        with audited(self.call_auth, who, "coordinate", subject or "new run"):
            stream = self._workflows.coordinate(
                who.agent_id, admin(who), definition, request.run_id, request.after_seq
            )
            first = await anext(stream, None)
        if first is not None:
            yield workflows_pb2.CoordinateResponse(events=first)
            async for events in stream:
                yield workflows_pb2.CoordinateResponse(events=events)

    @unary(workflows_pb2.GetWorkflowRequest)
    async def GetWorkflow(
        self, request: workflows_pb2.GetWorkflowRequest, context: Ctx
    ) -> workflows_pb2.GetWorkflowResponse:
        who = caller(context)
        with audited(self.call_auth, who, "get_workflow", request.run_id):
            run = await self._workflows.get(who.agent_id, admin(who), request.run_id)
        return workflows_pb2.GetWorkflowResponse(run=run)

    @unary(workflows_pb2.ListWorkflowsRequest)
    async def ListWorkflows(
        self, request: workflows_pb2.ListWorkflowsRequest, context: Ctx
    ) -> workflows_pb2.ListWorkflowsResponse:
        who = caller(context)
        if request.limit < 0:
            raise InvalidArgumentError("limit must not be negative", metadata={"field": "limit"})
        runs = await self._workflows.list_runs(
            who.agent_id, admin(who), list(request.states), min(request.limit or 100, 1000)
        )
        return workflows_pb2.ListWorkflowsResponse(runs=runs)

    @unary(workflows_pb2.CancelWorkflowRequest)
    async def CancelWorkflow(
        self, request: workflows_pb2.CancelWorkflowRequest, context: Ctx
    ) -> workflows_pb2.CancelWorkflowResponse:
        who = caller(context)
        with audited(self.call_auth, who, "cancel_workflow", request.run_id):
            run = await self._workflows.cancel(
                who.agent_id, admin(who), request.run_id, request.reason
            )
        return workflows_pb2.CancelWorkflowResponse(run=run)
