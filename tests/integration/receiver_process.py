"""An application that must see each message once, even when its process is killed:
`python -m tests.integration.receiver_process TARGET AGENT_ID STATE OUT COUNT`.

It records "<message id> <payload>" in OUT with one write per message (its side effect and its
record of what it handled are the same write), and on start gives the SDK the ids already in
OUT (`handled_ids`) along with the SDK's own state file. It exits once OUT holds COUNT lines."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import agentpost


async def main(target: str, agent_id: str, state: str, out: str, count: int) -> None:
    path = Path(out)
    lines = path.read_text().splitlines() if path.exists() else []
    handled = tuple(line.split(" ", 1)[0] for line in lines)
    options = agentpost.ConnectOptions(state_path=state, handled_ids=handled)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    done = len(lines)
    print("ready", flush=True)
    async with agentpost.connect(target, agent_id=agent_id, options=options) as agent:
        async for message in agent.messages():
            os.write(fd, f"{message.id} {message.payload}\n".encode())
            done += 1
            if done >= count:
                break
    os.close(fd)


if __name__ == "__main__":
    target, agent_id, state, out, count = sys.argv[1:6]
    asyncio.run(main(target, agent_id, state, out, int(count)))
