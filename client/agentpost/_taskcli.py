"""The task commands of the `agentpost` console script.

    agentpost --as planner handoff --to coder --title "Fix the build" --input '{"log": "..."}'
    agentpost --as planner handoff --capability code --title T --wait --timeout 600
    agentpost tasks --state working                   # a table (or --json)
    agentpost tasks --dead                            # failed, rejected and expired tasks
    agentpost task show ID --history
    agentpost --as planner task watch ID              # one line per event, until it ends
    agentpost --as planner task cancel ID --reason "not needed"
    agentpost audit --subject ID

`handoff --wait` and `task watch` exit 0 when the task completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any

from agentpost._clikit import (
    Command,
    add_globals,
    fail,
    header,
    json_value,
    parse_payload,
    positive,
    positive_int,
    print_table,
    print_value,
    time_text,
    with_client,
)
from agentpost.audit import AuditRecord
from agentpost.client import Client
from agentpost.errors import InvalidArgumentError, RequestTimeoutError, UnavailableError
from agentpost.tasks import MAX_PRIORITY, TaskEvent, TaskInfo, TaskState

__all__ = ["add_commands", "audit_json", "event_json", "event_line", "task_json"]

#: Makes a command: (name, what it runs, help) -> its parser (see `cli.build_parser`).
MakeCommand = Callable[[str, Command, str], argparse.ArgumentParser]

_STATES = [state.value for state in TaskState if state is not TaskState.UNKNOWN]


def add_commands(command: MakeCommand) -> None:
    """Add handoff, tasks, task (show, watch, cancel) and audit."""
    handoff = command(
        "handoff",
        _handoff,
        "Hand a task off to an agent or a capability; prints its id (with --wait, its result).",
    )
    target = handoff.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="AGENT", help="the agent that should do it")
    target.add_argument("--capability", metavar="CAP", help="any agent with this capability")
    handoff.add_argument("--title", required=True, metavar="T", help="what to do, 1-200 chars")
    handoff.add_argument("--description", default="", metavar="D", help="the details")
    handoff.add_argument(
        "--input",
        metavar="JSON",
        help="the task's input: JSON if it parses, else a string; - reads stdin",
    )
    handoff.add_argument("--context", metavar="JSON", help="a JSON object of context")
    handoff.add_argument(
        "--reference", action="append", default=[], type=header, metavar="K=V", help="(repeat)"
    )
    handoff.add_argument(
        "--priority", type=_priority, default=0, metavar="N", help="-1000..1000, higher first"
    )
    handoff.add_argument(
        "--deadline", type=positive, metavar="S", help="expire the task after S seconds"
    )
    handoff.add_argument(
        "--accept-timeout", type=positive, metavar="S", help="seconds an assignee has to accept"
    )
    handoff.add_argument(
        "--max-attempts", type=positive_int, metavar="N", help="assignees to try at most"
    )
    handoff.add_argument(
        "--idempotency-key",
        metavar="K",
        help="handing off again with the same K creates one task (default: a new key)",
    )
    handoff.add_argument(
        "--wait",
        action="store_true",
        help="follow the task (its events on stderr) and print its result; exit 1 unless it "
        "completed",
    )
    handoff.add_argument(
        "--timeout", type=positive, metavar="S", help="with --wait: give up after S seconds"
    )

    tasks = command("tasks", _tasks, "List tasks, newest first.")
    tasks.add_argument("--dead", action="store_true", help="only failed, rejected and expired")
    tasks.add_argument(
        "--state",
        dest="states",
        action="append",
        default=[],
        choices=_STATES,
        metavar="S",
        help=f"only tasks in this state (repeat): {', '.join(_STATES)}",
    )
    tasks.add_argument("--originator", metavar="A", help="only tasks handed off by A")
    tasks.add_argument("--assignee", metavar="A", help="only tasks assigned to A")
    tasks.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="at most N (default 100)"
    )

    task = command("task", _no_command, "Show, follow or cancel one task.")
    task_commands = task.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def sub(name: str, run: Command, help_text: str) -> argparse.ArgumentParser:
        parser = task_commands.add_parser(name, help=help_text, description=help_text)
        add_globals(parser, suppress=True)
        parser.set_defaults(command=run)
        parser.add_argument("id", metavar="ID", help="the task id")
        return parser

    show = sub("show", _show, "Show a task.")
    show.add_argument("--history", action="store_true", help="with every event")
    sub("watch", _watch, "Print a task's events until it ends; exit 1 unless it completed.")
    cancel = sub("cancel", _cancel, "Cancel a task (its originator only).")
    cancel.add_argument("--reason", default="", metavar="R", help="why, for the assignee")

    audit = command("audit", _audit, "Show the audit trail, newest first.")
    audit.add_argument("--subject", metavar="S", help="only about a task, run or agent id")
    audit.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="at most N (default 100)"
    )


def _priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not -MAX_PRIORITY <= value <= MAX_PRIORITY:
        raise argparse.ArgumentTypeError(f"must be from {-MAX_PRIORITY} to {MAX_PRIORITY}")
    return value


def _no_command(args: argparse.Namespace) -> int:  # pragma: no cover (argparse requires one)
    return fail("task needs a command: show, watch or cancel", status=2)


# ------------------------------------------------------------------------- commands


def _handoff(args: argparse.Namespace) -> int:
    if args.timeout is not None and not args.wait:
        return fail("--timeout needs --wait", status=2)
    context: Any = None
    if args.context is not None:
        context = parse_payload(args.context)
        if not isinstance(context, dict):
            return fail("--context must be a JSON object", status=2)
    task_input = parse_payload(args.input) if args.input is not None else None
    # A key of our own, not the SDK's short-lived one: the error below offers it for a retry.
    key = args.idempotency_key or secrets.token_urlsafe(16)

    async def run(client: Client) -> int:
        handle = await client.handoff(
            args.to,
            capability=args.capability,
            title=args.title,
            description=args.description,
            input=task_input,
            context=context,
            references=dict(args.reference),
            priority=args.priority,
            deadline=args.deadline,
            accept_timeout=args.accept_timeout,
            max_attempts=args.max_attempts,
            idempotency_key=key,
        )
        if not args.wait:
            if args.json:
                print(json.dumps({"task_id": handle.id, "duplicate": handle.duplicate}))
            else:
                print(handle.id)
            return 0
        print(f"task {handle.id}", file=sys.stderr, flush=True)
        return await _follow(client, handle.id, args, out=sys.stderr, limit=args.timeout)

    try:
        return with_client(args, run)
    except UnavailableError as exc:
        offered = exc.metadata.get("idempotency_key")
        if offered is None:
            raise
        return fail(f"{exc.message} (to retry safely: --idempotency-key {offered})")
    except InvalidArgumentError as exc:
        return fail(exc.message, status=2)


async def _follow(
    client: Client, task_id: str, args: argparse.Namespace, *, out: Any, limit: float | None
) -> int:
    """Print the task's events to `out` until it ends; its outcome, on stdout with --wait."""
    last: TaskEvent | None = None
    watching = contextlib.aclosing(client.watch_task(task_id))
    try:
        async with watching as events, asyncio.timeout(limit):
            async for event in events:
                last = event
                text = json.dumps(event_json(event), ensure_ascii=False)
                print(text if args.json else event_line(event), file=out, flush=True)
    except TimeoutError as exc:
        if isinstance(exc, RequestTimeoutError):
            raise
        raise RequestTimeoutError(f"task {task_id} did not end within {limit:g}s") from None
    if last is None or not last.terminal:  # pragma: no cover (a watch ends with the end)
        return fail(f"the watch of task {task_id} ended early")
    if out is sys.stderr:  # --wait: the outcome on stdout
        if args.json:
            outcome = {
                "task_id": task_id,
                "state": last.state.value,
                "result": json_value(last.payload) if last.state is TaskState.COMPLETED else None,
                "error": last.error,
            }
            print(json.dumps(outcome, ensure_ascii=False))
        elif last.state is TaskState.COMPLETED and last.payload is not None:
            print_value(last.payload)
    if last.state is TaskState.COMPLETED:
        return 0
    reason = last.error or last.message
    return fail(f"task {task_id} {last.state.value}" + (f": {reason}" if reason else ""))


def _tasks(args: argparse.Namespace) -> int:
    async def run(client: Client) -> list[TaskInfo]:
        return await client.list_tasks(
            dead=args.dead,
            states=args.states,
            originator=args.originator,
            assignee=args.assignee,
            limit=args.limit,
        )

    tasks = with_client(args, run)
    if args.json:
        print(json.dumps([task_json(task) for task in tasks], ensure_ascii=False))
        return 0
    _print_tasks(tasks)
    return 0


def _show(args: argparse.Namespace) -> int:
    async def run(client: Client) -> TaskInfo:
        return await client.get_task(args.id, history=args.history)

    task = with_client(args, run)
    if args.json:
        print(json.dumps(task_json(task), ensure_ascii=False))
        return 0
    rows = [
        ("id", task.id),
        ("title", task.title),
        ("state", task.state.value),
        ("originator", task.originator),
        ("target", task.target),
        ("assignee", task.assignee or "-"),
        ("attempt", str(task.attempt)),
        ("priority", str(task.priority)),
        ("created", time_text(task.created_at) or "-"),
        ("updated", time_text(task.updated_at) or "-"),
        ("deadline", time_text(task.deadline) or "-"),
    ]
    if task.description:
        rows.append(("description", task.description))
    if task.input is not None:
        rows.append(("input", _short(task.input)))
    if task.result is not None:
        rows.append(("result", _short(task.result)))
    if task.error is not None:
        rows.append(("error", task.error + (" (retryable)" if task.retryable else "")))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name + ':':<{width + 1}}  {value}")
    for event in task.history:
        print(event_line(event))
    return 0


def _watch(args: argparse.Namespace) -> int:
    async def run(client: Client) -> int:
        return await _follow(client, args.id, args, out=sys.stdout, limit=None)

    return with_client(args, run)


def _cancel(args: argparse.Namespace) -> int:
    async def run(client: Client) -> TaskInfo:
        return await client.cancel_task(args.id, args.reason)

    task = with_client(args, run)
    if args.json:
        print(json.dumps(task_json(task), ensure_ascii=False))
    else:
        print(f"{task.id} {task.state.value}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    async def run(client: Client) -> list[AuditRecord]:
        return await client.audit(args.subject, args.limit)

    records = with_client(args, run)
    if args.json:
        print(json.dumps([audit_json(record) for record in records], ensure_ascii=False))
        return 0
    rows = [("TIME", "ACTOR", "ACTION", "SUBJECT", "DETAILS")]
    for record in records:
        details = " ".join(f"{k}={v}" for k, v in sorted(record.details.items())) or "-"
        stamp = record.time.isoformat(timespec="seconds") if record.time else "-"
        rows.append((stamp, record.actor, record.action, record.subject, details))
    print_table(rows)
    return 0


def _print_tasks(tasks: Sequence[TaskInfo]) -> None:
    rows = [("ID", "STATE", "ORIGINATOR", "TARGET", "ASSIGNEE", "ATTEMPT", "UPDATED", "TITLE")]
    for task in tasks:
        updated = task.updated_at.isoformat(timespec="seconds") if task.updated_at else "-"
        rows.append(
            (
                task.id,
                task.state.value,
                task.originator,
                task.target,
                task.assignee or "-",
                str(task.attempt),
                updated,
                task.title,
            )
        )
    print_table(rows)


# ------------------------------------------------------------------------- output


def event_line(event: TaskEvent) -> str:
    """One human line: time, seq, state, actor, percent, message (or error)."""
    stamp = event.time.isoformat(timespec="milliseconds") if event.time else "-"
    parts = [stamp, f"#{event.seq}", event.state.value]
    if event.kind.value != "transition":
        parts[-1] += f" ({event.kind.value})"
    parts.append(event.actor or "-")
    if event.percent is not None:
        parts.append(f"{event.percent}%")
    text = event.error or event.message
    if text:
        parts.append(text)
    if event.payload is not None and event.state is not TaskState.COMPLETED:
        parts.append(_short(event.payload))
    return "  ".join(parts)


def _short(value: Any, limit: int = 200) -> str:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def event_json(event: TaskEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "task_id": event.task_id,
        "kind": event.kind.value,
        "state": event.state.value,
        "actor": event.actor,
        "time": time_text(event.time),
        "message": event.message,
        "percent": event.percent,
        "assignee": event.assignee,
        "attempt": event.attempt,
        "payload": json_value(event.payload),
        "error": event.error,
        "retryable": event.retryable,
    }


def task_json(task: TaskInfo) -> dict[str, Any]:
    return {
        "id": task.id,
        "originator": task.originator,
        "agent_id": task.agent_id,
        "capability": task.capability,
        "title": task.title,
        "description": task.description,
        "input": json_value(task.input),
        "context": task.context,
        "references": task.references,
        "priority": task.priority,
        "deadline": time_text(task.deadline),
        "accept_timeout": task.accept_timeout,
        "max_attempts": task.max_attempts,
        "state": task.state.value,
        "assignee": task.assignee,
        "attempt": task.attempt,
        "created_at": time_text(task.created_at),
        "updated_at": time_text(task.updated_at),
        "result": json_value(task.result),
        "error": task.error,
        "retryable": task.retryable,
        "history": [event_json(event) for event in task.history],
        "workflow_run_id": task.workflow_run_id,
        "workflow_step_id": task.workflow_step_id,
    }


def audit_json(record: AuditRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "time": time_text(record.time),
        "actor": record.actor,
        "action": record.action,
        "subject": record.subject,
        "details": record.details,
    }
