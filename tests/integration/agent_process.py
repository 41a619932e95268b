"""A real agent process for tests where the client's own death is the point:
`python -m tests.integration.agent_process TARGET AGENT_ID` connects, prints "ready", and waits."""

from __future__ import annotations

import asyncio
import sys

import agentpost


async def main(target: str, agent_id: str) -> None:
    async with agentpost.connect(target, agent_id=agent_id, capabilities=["probe"]):
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
