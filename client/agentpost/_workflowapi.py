"""`WorkflowMethods`: the workflow methods that `Agent` and `Client` share (coordinate, attach,
get_workflow, list_workflows, cancel_workflow), over the `WorkflowCalls` of their identity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentpost._workflowcalls import WorkflowCalls
from agentpost.run_handle import Definition, RunHandle, prepare_definition
from agentpost.workflow_run import WorkflowInfo, WorkflowRunState

__all__ = ["WorkflowMethods"]


class WorkflowMethods:
    """Mixed into `Agent` and `Client`, which provide `_workflow_calls()`."""

    def _workflow_calls(self) -> WorkflowCalls:  # pragma: no cover (always overridden)
        raise NotImplementedError

    async def coordinate(
        self, definition: Definition, *, run_id: str | None = None, input: Any = None
    ) -> RunHandle:
        """Start a workflow run; returns its handle once the server accepted it.

        `definition` is a `WorkflowDefinition`, plain data in the file format of
        `agentpost.workflow`, or the path of a .yaml/.yml/.json file. `run_id` and `input`
        (JSON data) override the definition's when given. Starting a run whose id exists
        attaches to that run instead (its definition is then ignored); a definition without an
        id gets a new one, so the start is repeated safely after a lost connection.

        `async for event in run` follows it (re-attaching after a dropped stream), and
        `await run.result()` waits for its outputs. Raises `InvalidWorkflowError` for an
        invalid definition (locally for a malformed one, from the server for cycles, unknown
        references and the like), `UnavailableError` when the server stays unreachable.
        """
        proto = prepare_definition(definition, run_id=run_id, input=input)
        return await RunHandle.start(self._workflow_calls(), proto)

    def attach(self, run_id: str, after_seq: int = 0) -> RunHandle:
        """The handle of an existing run, following its events after `after_seq` (0: from the
        first); nothing is called before it is used (`WorkflowNotFoundError` then)."""
        return RunHandle(self._workflow_calls(), run_id, after_seq=after_seq)

    async def get_workflow(self, run_id: str) -> WorkflowInfo:
        """A run as the server knows it: state, every step, outputs or error;
        `WorkflowNotFoundError`."""
        return await self._workflow_calls().get(run_id)

    async def list_workflows(
        self, *, states: Sequence[WorkflowRunState | str] = (), limit: int = 100
    ) -> list[WorkflowInfo]:
        """Runs, newest first, only in `states` (e.g. "running"), at most `limit` (1-1000).
        The server may leave out the steps' details here (`get_workflow` has them)."""
        return await self._workflow_calls().list_runs(states=states, limit=limit)

    async def cancel_workflow(self, run_id: str, reason: str = "") -> WorkflowInfo:
        """Cancel a running workflow (its running steps' tasks are canceled); the run after
        it. `WorkflowStateError` if it has ended already."""
        return await self._workflow_calls().cancel(run_id, reason)
