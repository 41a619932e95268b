"""What the workflow commands show: a run folded from its events into one row per step
(`RunView`), rendered live with `rich` (imported lazily: it is in `agentpost[cli]`), and the
JSON and text forms of events and runs."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
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
            return
        row.percent = None  # a new stage: the last attempt's progress is over
        if kind is K.STEP_RETRYING and event.retry_delay is not None:
            row.note = f"again in {event.retry_delay:g}s: {event.message}".rstrip(": ")
        elif kind is K.STEP_COMPLETED:
            row.note = short(event.payload, 200)
        else:
            row.note = event.message

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        """Rendered anew on every refresh (so spinners and the clock move), to the width."""
        yield self.render(options.max_width)

    def render(self, width: int = 100) -> Any:
        """The renderable: a title, one line per step, and the outcome once known."""
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
        cells = [
            (
                row.id,
                row.state,
                row.target or "-",
                row.agent or "-",
                str(row.attempt) if row.attempt else "-",
            )
            for row in self.rows.values()
        ]
        table = Table(box=None, pad_edge=False, show_edge=False, header_style="dim")
        table.add_column("", min_width=1, no_wrap=True)
        for index, column in enumerate(("STEP", "STATE", "TARGET", "AGENT", "TRY")):
            # One line per step: these keep their width, PROGRESS gets what is left.
            fits = max([len(column), *(min(len(cell[index]), 24) for cell in cells)])
            table.add_column(column, min_width=fits, no_wrap=True, overflow="ellipsis")
        # The mark, five columns of their own width and PROGRESS, two spaces between each.
        used = 1 + sum(column.min_width or 0 for column in table.columns[1:]) + 2 * 6
        room = max(10, width - used)
        table.add_column("PROGRESS", no_wrap=True, overflow="ellipsis", max_width=room)
        for row, cell in zip(self.rows.values(), cells, strict=True):
            mark: Any
            if row.state in _BUSY and self.state == "running":
                mark = self._spinners.setdefault(row.id, Spinner("dots", style="cyan"))
            else:
                mark = Text.from_markup(_MARKS.get(row.state, "[dim]·[/]"))
            progress = f"{row.percent:>3}% " if row.percent is not None else ""
            step_id, state, target, agent, attempt = cell
            note = Text(progress + row.note)
            note.truncate(room, overflow="ellipsis")
            table.add_row(
                mark,
                step_id,
                Text(state, style=_STYLES.get(state, "")),
                target,
                agent,
                attempt,
                note,
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
