"""What the workflow commands show: a run folded from its events into one row per step
(`RunView`), rendered live with `rich` (imported lazily: it is in `agentpost[cli]`), and the
JSON and text forms of events and runs."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from agentpost._clikit import json_value, time_text
from agentpost.workflow_run import (
    WorkflowEvent,
    WorkflowEventKind,
    WorkflowInfo,
    WorkflowStepInfo,
)

__all__ = [
    "NEEDS_RICH",
    "RunView",
    "event_json",
    "event_line",
    "have_rich",
    "short",
    "step_json",
    "workflow_json",
]

NEEDS_RICH = "the live display needs rich: pip install 'agentpost[cli]' (or use --json)"

K = WorkflowEventKind
# The state a step shows after an event of each kind (the run events change no step).
_STEP_STATE = {
    K.STEP_WAITING: "waiting",
    K.STEP_OFFERED: "offered",
    K.STEP_STARTED: "running",
    K.STEP_PROGRESS: "running",
    K.STEP_COMPLETED: "completed",
    K.STEP_FAILED: "failed",
    K.STEP_RETRYING: "retrying",
    K.STEP_SKIPPED: "skipped",
}
_BUSY = {"offered", "running", "retrying", "retry-wait"}
_MARKS = {"completed": "[green]✓[/]", "failed": "[red]✗[/]", "skipped": "[dim]-[/]"}
_STYLES = {"completed": "green", "failed": "red", "canceled": "yellow", "skipped": "dim"}


def have_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


@dataclasses.dataclass
class StepRow:
    id: str
    target: str = ""
    state: str = "pending"
    agent: str = ""
    attempt: int = 0
    percent: int | None = None
    note: str = ""


class RunView:
    """A run as a table: one row per step, in definition order, updated by each event."""

    def __init__(self, run_id: str, name: str = "", steps: Sequence[tuple[str, str]] = ()) -> None:
        self.run_id = run_id
        self.name = name
        self.state = "running"
        self.rows: dict[str, StepRow] = {sid: StepRow(sid, target) for sid, target in steps}
        self.started = time.monotonic()
        self.outcome = ""
        self._spinners: dict[str, Any] = {}

    @classmethod
    def of_info(cls, info: WorkflowInfo) -> RunView:
        """Seeded from the run's record (attaching to a run under way)."""
        view = cls(info.id, info.name, [(step.id, step.target) for step in info.steps])
        view.state = info.state.value
        for step in info.steps:
            row = view.rows[step.id]
            row.state, row.agent, row.attempt = step.state.value, step.assignee or "", step.attempt
            row.note = step.error or ""
        return view

    def apply(self, event: WorkflowEvent) -> None:
        kind = event.kind
        if kind is K.RUN_COMPLETED:
            self.state = "completed"
        elif kind is K.RUN_FAILED:
            self.state = "failed"
            self.outcome = event.message
        elif kind is K.RUN_CANCELED:
            self.state = "canceled"
            self.outcome = event.message
            for row in self.rows.values():
                if row.state not in ("completed", "failed", "skipped"):
                    row.state = "canceled"
        if event.step_id is None or kind not in _STEP_STATE:
            return
        row = self.rows.setdefault(event.step_id, StepRow(event.step_id))
        row.state = _STEP_STATE[kind]
        if event.agent_id:
            row.agent = event.agent_id
        if event.attempt:
            row.attempt = event.attempt
        if kind is K.STEP_PROGRESS:
            row.percent = event.percent if event.percent is not None else row.percent
            row.note = event.message
        elif kind is K.STEP_RETRYING and event.retry_delay is not None:
            row.note = f"again in {event.retry_delay:g}s: {event.message}".rstrip(": ")
        elif kind is K.STEP_COMPLETED:
            row.percent, row.note = None, short(event.payload, 60)
        elif kind is K.STEP_STARTED:
            row.percent, row.note = None, event.message
        else:
            row.note = event.message

    def __rich__(self) -> Any:
        """The renderable (re-rendered on every refresh, so spinners and the clock move)."""
        from rich.console import Group
        from rich.spinner import Spinner
        from rich.table import Table
        from rich.text import Text

        elapsed = time.monotonic() - self.started
        style = _STYLES.get(self.state, "bold")
        title = Text.assemble(
            ("workflow ", "dim"),
            (self.name or "-", "bold"),
            ("  run ", "dim"),
            (self.run_id, "cyan"),
            "  ",
            (self.state, style),
            (f"  {elapsed:.0f}s", "dim"),
        )
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="dim")
        for column in ("", "STEP", "STATE", "TARGET", "AGENT", "TRY", "PROGRESS"):
            table.add_column(column, no_wrap=column != "PROGRESS", overflow="ellipsis")
        for row in self.rows.values():
            mark: Any
            if row.state in _BUSY and self.state == "running":
                mark = self._spinners.setdefault(row.id, Spinner("dots", style="cyan"))
            else:
                mark = Text.from_markup(_MARKS.get(row.state, "[dim]·[/]"))
            progress = f"{row.percent:>3}% " if row.percent is not None else ""
            table.add_row(
                mark,
                row.id,
                Text(row.state, style=_STYLES.get(row.state, "")),
                row.target or "-",
                row.agent or "-",
                str(row.attempt) if row.attempt else "-",
                Text(progress + row.note),
            )
        parts: list[Any] = [title, table]
        if self.outcome:
            parts.append(Text(self.outcome, style=style))
        return Group(*parts)


# ------------------------------------------------------------------------- text and JSON


def short(value: Any, limit: int = 200) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def event_line(event: WorkflowEvent) -> str:
    """One human line: time, seq, kind, step, agent, attempt, message (or payload)."""
    stamp = event.time.isoformat(timespec="milliseconds") if event.time else "-"
    parts = [stamp, f"#{event.seq}", event.kind.value, event.step_id or "-"]
    if event.agent_id:
        parts.append(event.agent_id)
    if event.attempt > 1:
        parts.append(f"attempt {event.attempt}")
    if event.percent is not None:
        parts.append(f"{event.percent}%")
    if event.retry_delay is not None:
        parts.append(f"in {event.retry_delay:g}s")
    if event.message:
        parts.append(event.message)
    if event.payload is not None:
        parts.append(short(event.payload))
    return "  ".join(parts)


def event_json(event: WorkflowEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "run_id": event.run_id,
        "kind": event.kind.value,
        "step_id": event.step_id,
        "task_id": event.task_id,
        "attempt": event.attempt,
        "message": event.message,
        "payload": json_value(event.payload),
        "time": time_text(event.time),
        "percent": event.percent,
        "agent_id": event.agent_id,
        "retry_delay": event.retry_delay,
    }


def step_json(step: WorkflowStepInfo) -> dict[str, Any]:
    return {
        "id": step.id,
        "state": step.state.value,
        "agent_id": step.agent_id,
        "capability": step.capability,
        "title": step.title,
        "depends_on": list(step.depends_on),
        "attempt": step.attempt,
        "task_id": step.task_id,
        "assignee": step.assignee,
        "failed_assignees": list(step.failed_assignees),
        "output": json_value(step.output),
        "error": step.error,
        "started_at": time_text(step.started_at),
        "finished_at": time_text(step.finished_at),
        "fell_back_to": step.fell_back_to,
        "skipped_upstream": step.skipped_upstream,
    }


def workflow_json(info: WorkflowInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "name": info.name,
        "state": info.state.value,
        "originator": info.originator,
        "input": json_value(info.input),
        "outputs": json_value(info.outputs),
        "error_step_id": info.error_step_id,
        "error": info.error,
        "created_at": time_text(info.created_at),
        "updated_at": time_text(info.updated_at),
        "last_seq": info.last_seq,
        "steps": [step_json(step) for step in info.steps],
    }
