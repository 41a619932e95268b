"""The README's promises: its Python examples run as shown, against a real server."""

from __future__ import annotations

import ast
import asyncio
import re
import sys

from tests.helpers import ROOT


async def run_example(section: str, target: str) -> list[str]:
    """Run the first Python block under the README heading `section`; its output lines."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(rf"## {section}.*?```python\n(.*?)```", readme, re.S)
    assert code is not None, f"README has no Python example under {section!r}"
    script = code.group(1).replace("127.0.0.1:50051", target)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode().splitlines()


async def test_quickstart_runs_and_prints_the_reply(target: str) -> None:
    lines = await run_example("Quickstart", target)
    assert ast.literal_eval(lines[0]) == {"verdict": "ship it", "files": ["a.py"]}
    assert lines[1] == "planner {'note': 'plan is ready'}"


async def test_the_handoff_example_runs_and_prints_the_result(target: str) -> None:
    lines = await run_example("Task handoffs", target)
    assert [line.split()[0] for line in lines[:-1]] == [
        "submitted",
        "offered",
        "working",
        "working",
        "completed",
    ]
    assert ast.literal_eval(lines[-1]) == {"patch": "fixed test_cache"}
