"""The workflow commands of the `agentpost` console script.

    agentpost --as lead workflow run examples/review.yaml   # live progress, then the outputs
    agentpost workflow run flow.yaml --input '{"request": "x"}' --run-id release-42 --json
    agentpost workflow watch ID --after 12                   # follow a run (from event 13)
    agentpost workflow list --state running                 # a table (or --json)
    agentpost workflow show ID                               # the run and its steps
    agentpost --as lead workflow cancel ID --reason "not needed"

`workflow run` and `workflow watch` show a live table (with `rich`, from `agentpost[cli]`) when
stdout is a terminal, else (and with --json) one JSON line per event. They exit 0 when the run
completed, 1 when it failed (or on an error), 2 when it was canceled. Ctrl-C stops following;
the run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable, Sequence

from agentpost._clikit import (
    Command,
    add_globals,
    fail,
    parse_payload,
    positive_int,
    print_table,
    print_value,
    time_text,
    with_client,
)
from agentpost._workflow_view import (
    NEEDS_RICH,
    RunView,
    event_json,
    have_rich,
    short,
    workflow_json,
)
from agentpost.client import Client
from agentpost.errors import UnavailableError
from agentpost.run_handle import RunHandle, prepare_definition
from agentpost.workflow_run import WorkflowFailedError, WorkflowInfo, WorkflowRunState

__all__ = ["EXIT_CANCELED", "EXIT_FAILED", "add_commands"]

#: Makes a command: (name, what it runs, help) -> its parser (see `cli.build_parser`).
MakeCommand = Callable[[str, Command, str], argparse.ArgumentParser]

#: Exit status of `workflow run` / `workflow watch` for a run that failed, or was canceled.
EXIT_FAILED = 1
EXIT_CANCELED = 2

_STATES = [state.value for state in WorkflowRunState if state is not WorkflowRunState.UNKNOWN]
_OUTCOME = "exit 0 when the run completed, 1 when it failed, 2 when it was canceled"


def add_commands(command: MakeCommand) -> None:
    """Add `workflow` with run, watch, list, show and cancel."""
    workflow = command("workflow", _no_command, "Run, follow, list, show or cancel workflows.")
    commands = workflow.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def sub(name: str, run: Command, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, description=help_text)
        add_globals(parser, suppress=True)
        parser.set_defaults(command=run)
        return parser

    run = sub(
        "run",
        _run,
        "Start a workflow from a YAML or JSON file and follow it until it ends (a live table "
        f"on a terminal, else one JSON line per event); {_OUTCOME}.",
    )
    run.add_argument("file", metavar="FILE", help="the workflow definition (.yaml, .yml, .json)")
    run.add_argument(
        "--run-id",
        metavar="ID",
        help="the run's id (default: the file's, else a new one); an existing run's id "
        "follows that run instead of starting another",
    )
    run.add_argument(
        "--input", metavar="JSON", help="the run's input, replacing the file's (JSON, or a string)"
    )

    watch = sub("watch", _watch, f"Follow a run until it ends; {_OUTCOME}.")
    watch.add_argument("id", metavar="ID", help="the run id")
    watch.add_argument(
        "--after", type=_seq, default=0, metavar="N", help="only the events after event N"
    )

    listing = sub("list", _list, "List workflow runs, newest first.")
    listing.add_argument(
        "--state",
        dest="states",
        action="append",
        default=[],
        choices=_STATES,
        metavar="S",
        help=f"only runs in this state (repeat): {', '.join(_STATES)}",
    )
    listing.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="at most N (default 100)"
    )

    show = sub("show", _show, "Show a run: its state, outputs or error, and every step.")
    show.add_argument("id", metavar="ID", help="the run id")

    cancel = sub("cancel", _cancel, "Cancel a running workflow (its running tasks are canceled).")
    cancel.add_argument("id", metavar="ID", help="the run id")
    cancel.add_argument("--reason", default="", metavar="R", help="why, for the log and the agents")


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _no_command(args: argparse.Namespace) -> int:  # pragma: no cover (argparse requires one)
    return fail("workflow needs a command: run, watch, list, show or cancel", status=2)


# ------------------------------------------------------------------------- run and watch


def _run(args: argparse.Namespace) -> int:
    run_input = parse_payload(args.input) if args.input is not None else None
    definition = prepare_definition(args.file, run_id=args.run_id, input=run_input)
    live = _live(args)
    if live and not have_rich():
        return fail(NEEDS_RICH)
    steps = [
        (step.id, step.agent_id or f"capability:{step.capability}") for step in definition.steps
    ]
    view = RunView(definition.run_id, definition.name, steps)
    started: list[RunHandle] = []

    async def go(client: Client) -> int:
        run = await client.coordinate(definition)
        started.append(run)
        return await _follow(run, view, args, live)

    return _following(definition.run_id, lambda: with_client(args, go), lambda: bool(started))


def _watch(args: argparse.Namespace) -> int:
    live = _live(args)
    if live and not have_rich():
        return fail(NEEDS_RICH)

    async def go(client: Client) -> int:
        info = await client.get_workflow(args.id)
        if args.after:
            view = RunView.of_info(info)
        else:
            view = RunView(info.id, info.name, [(step.id, step.target) for step in info.steps])
        return await _follow(client.attach(args.id, after_seq=args.after), view, args, live)

    return _following(args.id, lambda: with_client(args, go), lambda: True)


def _live(args: argparse.Namespace) -> bool:
    return not args.json and sys.stdout.isatty()


def _following(run_id: str, go: Callable[[], int], started: Callable[[], bool]) -> int:
    """Run `go`; once the run started, a lost server or Ctrl-C says how to pick it up again."""
    hint = f"the run goes on: agentpost workflow watch {run_id}"
    try:
        return go()
    except KeyboardInterrupt:
        if started():
            print(f"agentpost: {hint}", file=sys.stderr)
        return 130
    except UnavailableError as exc:  # the server went away: following stopped, not the run
        if not started():
            raise
        return fail(f"{exc.message} ({hint})")


async def _follow(run: RunHandle, view: RunView, args: argparse.Namespace, live: bool) -> int:
    """Show the run's events until it ends; the exit status of its outcome."""
    async with run:
        if live:
            from rich.console import Console
            from rich.live import Live

            with Live(view, console=Console(), refresh_per_second=10, transient=False):
                async for event in run:
                    view.apply(event)
        else:
            async for event in run:
                print(json.dumps(event_json(event), ensure_ascii=False), flush=True)
        try:
            outputs = await run.result()
        except WorkflowFailedError as exc:
            fail(exc.message)
            return EXIT_CANCELED if exc.state is WorkflowRunState.CANCELED else EXIT_FAILED
    if live:
        print_value(outputs)
    return 0


# ------------------------------------------------------------------------- list, show, cancel


def _list(args: argparse.Namespace) -> int:
    async def go(client: Client) -> list[WorkflowInfo]:
        return await client.list_workflows(states=args.states, limit=args.limit)

    runs = with_client(args, go)
    if args.json:
        print(json.dumps([workflow_json(run) for run in runs], ensure_ascii=False))
        return 0
    rows = [("ID", "STATE", "NAME", "ORIGINATOR", "STEPS", "CREATED", "UPDATED")]
    for run in runs:
        done = sum(1 for step in run.steps if step.state.terminal)
        rows.append(
            (
                run.id,
                run.state.value,
                run.name or "-",
                run.originator or "-",
                f"{done}/{len(run.steps)}" if run.steps else "-",
                _stamp(run.created_at),
                _stamp(run.updated_at),
            )
        )
    print_table(rows)
    return 0


def _show(args: argparse.Namespace) -> int:
    async def go(client: Client) -> WorkflowInfo:
        return await client.get_workflow(args.id)

    run = with_client(args, go)
    if args.json:
        print(json.dumps(workflow_json(run), ensure_ascii=False))
        return 0
    fields = [
        ("id", run.id),
        ("name", run.name or "-"),
        ("state", run.state.value),
        ("originator", run.originator or "-"),
        ("created", time_text(run.created_at) or "-"),
        ("updated", time_text(run.updated_at) or "-"),
        ("events", str(run.last_seq)),
    ]
    if run.input is not None:
        fields.append(("input", short(run.input)))
    if run.outputs is not None:
        fields.append(("outputs", short(run.outputs)))
    if run.error is not None:
        where = f"step {run.error_step_id}: " if run.error_step_id else ""
        fields.append(("error", where + run.error))
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name + ':':<{width + 1}}  {value}")
    print()
    _print_steps(run)
    return 0


def _print_steps(run: WorkflowInfo) -> None:
    rows: list[Sequence[str]] = [
        ("STEP", "STATE", "TARGET", "ASSIGNEE", "TRY", "TASK", "OUTPUT / ERROR")
    ]
    for step in run.steps:
        note = step.error if step.error is not None else short(step.output, 60)
        if step.fell_back_to:
            note = f"fell back to {step.fell_back_to}" + (f": {note}" if note else "")
        rows.append(
            (
                step.id,
                step.state.value,
                step.target,
                step.assignee or "-",
                str(step.attempt) if step.attempt else "-",
                step.task_id or "-",
                note or "-",
            )
        )
    print_table(rows)


def _cancel(args: argparse.Namespace) -> int:
    async def go(client: Client) -> WorkflowInfo:
        return await client.cancel_workflow(args.id, args.reason)

    run = with_client(args, go)
    if args.json:
        print(json.dumps(workflow_json(run), ensure_ascii=False))
    else:
        print(f"{run.id} {run.state.value}")
    return 0


def _stamp(value: datetime.datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else "-"
