"""Example agents for examples/review.yaml: a planner, two coders and a reviewer, in one process.

    python examples/agents.py                  # against $AGENTPOST_SERVER or 127.0.0.1:50051
    python examples/agents.py --flaky          # coder-1 fails its first implementation attempt
    python examples/agents.py --delay 5        # slower steps, to watch the progress

Each agent connects with its capabilities and answers the tasks offered to it with a canned
output after a short, reported, pause: the SDK accepts each offer, runs the handler, and
completes the task with the handler's return value (an exception fails it). Stop with Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

import agentpost

Work = Callable[[agentpost.Assignment], Awaitable[Any]]


async def _work(task: agentpost.Assignment, delay: float, *notes: str) -> None:
    """Report progress through `notes`, spread over `delay` seconds."""
    for index, note in enumerate(notes):
        await task.progress(note, percent=100 * index / len(notes))
        await asyncio.sleep(delay / len(notes))


def _step(task: agentpost.Assignment) -> str:
    """The workflow step a task stands for ("" for a task handed off by hand)."""
    return task.info.workflow_step_id or ""


def planner(delay: float) -> Work:
    async def plan(task: agentpost.Assignment) -> Any:
        request = (task.input or {}).get("request", task.title)
        await _work(task, delay, "reading the code", "writing the plan")
        return {
            "request": request,
            "files": ["client/agentpost/cli.py"],
            "tests": ["tests/integration/test_cli.py"],
            "steps": ["add the --json flag", "print the mailbox as JSON"],
        }

    return plan


def coder(name: str, delay: float, flaky: bool) -> Work:
    failures = {"left": 1 if flaky else 0}

    async def code(task: agentpost.Assignment) -> Any:
        files = (task.input or {}).get("files", [])
        if _step(task) == "test":
            await _work(task, delay, "writing tests", "running them")
            return {"count": 3 * len(files), "passed": True, "by": name}
        await _work(task, delay, f"editing {len(files)} file(s)", "building")
        if failures["left"]:
            failures["left"] -= 1
            # Finishing the task ourselves: retryable, so the workflow tries again elsewhere.
            await task.fail("the build broke (flaky on purpose)", retryable=True)
            return None
        return {"diff": f"+ --json ({name})", "files": files, "by": name}

    return code


def reviewer(delay: float) -> Work:
    async def review(task: agentpost.Assignment) -> Any:
        await _work(task, delay, "reading the diff", "checking the tests")
        return {"approved": True, "comments": ["looks good"]}

    return review


async def main(server: str, delay: float, flaky: bool) -> None:
    roles: list[tuple[str, list[str], Work]] = [
        ("planner", ["plan"], planner(delay)),
        ("coder-1", ["code"], coder("coder-1", delay, flaky)),
        ("coder-2", ["code"], coder("coder-2", delay, False)),
        ("reviewer", ["review"], reviewer(delay)),
    ]
    async with contextlib.AsyncExitStack() as stack:
        for agent_id, capabilities, work in roles:
            agent = await stack.enter_async_context(
                agentpost.connect(server, agent_id=agent_id, capabilities=capabilities)
            )
            agent.handle_tasks(_logged(agent_id, work))
            print(f"{agent_id:<9} ready: {', '.join(capabilities)}", flush=True)
        print(f"connected to {server}; Ctrl-C to stop", flush=True)
        await asyncio.Event().wait()  # until Ctrl-C


def _logged(agent_id: str, work: Work) -> Work:
    async def handle(task: agentpost.Assignment) -> Any:
        where = f"{task.info.workflow_run_id}/{_step(task)}" if _step(task) else task.id
        print(f"{agent_id:<9} took   {where} (task {task.id})", flush=True)
        result = await work(task)
        print(f"{agent_id:<9} {'failed' if task.finished else 'done':<6} {where}", flush=True)
        return result

    return handle


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--server",
        default=os.environ.get("AGENTPOST_SERVER") or "127.0.0.1:50051",
        help="server address (default: $AGENTPOST_SERVER or 127.0.0.1:50051)",
    )
    parser.add_argument("--delay", type=float, default=1.5, help="seconds per step (1.5)")
    parser.add_argument(
        "--flaky", action="store_true", help="coder-1 fails its first implementation"
    )
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.server, args.delay, args.flaky))
