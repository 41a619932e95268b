"""`python -m bench [--quick] [--auth] [--only direct,request,...,ceiling] [--profile DIR]`.

`--auth`: the server requires a JWT (AGENTPOST_JWT_SECRET) and every agent presents its own.
`handoff` and `workflow` run against a server of their own with the arq worker inside (the
workflow steps advance through its jobs); the messaging patterns against one without."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from agentpost.config import ConnectOptions
from agentpost.errors import AgentpostError
from bench import ceiling, handoffs, procs, scenarios
from bench.probe import Probe, summarize
from bench.report import machine, table, write_json
from bench.stats import Run

PARTS = ("direct", "request", "broadcast", "handoff", "workflow", "ceiling")
MESSAGING = {"direct", "request", "broadcast"}
TASKS = {"handoff", "workflow"}
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"
#: The shapes of the handoff and workflow parts (the same in quick runs): originator loops of
#: the end-to-end handoffs, assignee agents (end-to-end handoffs and workflows), steps of the
#: chain, parallel steps of the fan-out (plus its root and its join).
SHAPES = {"originators": 16, "assignees": 4, "chain_steps": 20, "fan_width": 20}
FULL = {
    "direct": 50_000,
    "window": 2_000,
    "request_1": 3_000,
    "request_16": 20_000,
    "agents": 100,
    "rounds": 20,
    "handoff_offer": 2_000,
    "handoff_e2e": 3_000,
    "workflow_runs": 10,
    **SHAPES,
}
QUICK = {
    "direct": 5_000,
    "window": 2_000,
    "request_1": 300,
    "request_16": 2_000,
    "agents": 100,
    "rounds": 5,
    "handoff_offer": 200,
    "handoff_e2e": 300,
    "workflow_runs": 2,
    **SHAPES,
}
#: Seconds without progress after which a pattern gives up (and per request).
TIMEOUT = 20.0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity run (< 30 s)")
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument(
        "--auth", action="store_true", help="authentication on: every agent presents a JWT"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record py-spy profiles of server and client per pattern into DIR",
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    args = parser.parse_args(argv)
    args.parts = {part.strip() for part in args.only.split(",") if part.strip()}
    unknown = args.parts - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {PARTS}")
    return args


class Outcomes:
    """The runs that finished and, by name, why the others failed (the rest still runs)."""

    def __init__(self) -> None:
        self.results: dict[str, Run] = {}
        self.failures: dict[str, str] = {}
        self.profiles: list[Path] = []

    async def attempt(self, name: str, what: str, work: Coroutine[Any, Any, Run]) -> None:
        _progress(what)
        try:
            self.results[name] = await work
        except* (procs.BenchError, AgentpostError, TimeoutError) as group:
            # The concurrent loops (`scenarios.spread`) fail as a group: the first error tells.
            exc = _first(group)
            reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            self.failures[name] = reason
            _progress(f"{name} FAILED: {reason}")


def _first(error: BaseException) -> BaseException:
    """The first leaf of an exception group (or the exception itself)."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


async def run_agentpost(
    outcomes: Outcomes,
    parts: set[str],
    sizes: dict[str, int],
    directory: Path,
    pin: bool,
    profile: Path | None,
    auth: bool = False,
) -> None:
    env, credentials = _credentials(auth)
    with procs.redis_server(directory) as redis:
        async with procs.agentpost_server(
            redis.target, directory, pin=pin, extra_env=env
        ) as server:
            pids = {"server": server.pid, "client": os.getpid(), "redis": redis.pid}
            probe = Probe(pids, profile)
            target = server.target
            if "direct" in parts:
                await outcomes.attempt(
                    "direct",
                    "agentpost direct one-way",
                    scenarios.direct(
                        target,
                        count=sizes["direct"],
                        window=sizes["window"],
                        probe=probe,
                        timeout=TIMEOUT,
                        credentials=credentials,
                    ),
                )
            if "request" in parts:
                for callers in (1, 16):
                    await outcomes.attempt(
                        f"request-{callers}",
                        f"agentpost request/response, {callers} caller(s)",
                        scenarios.request(
                            target,
                            count=sizes[f"request_{callers}"],
                            callers=callers,
                            probe=probe,
                            name=f"request-{callers}",
                            timeout=TIMEOUT,
                            credentials=credentials,
                        ),
                    )
            if "broadcast" in parts:
                await outcomes.attempt(
                    "broadcast",
                    f"agentpost broadcast to {sizes['agents']} agents",
                    scenarios.broadcast(
                        target,
                        agents=sizes["agents"],
                        rounds=sizes["rounds"],
                        probe=probe,
                        timeout=TIMEOUT,
                        credentials=credentials,
                    ),
                )
            server.check_alive()
    outcomes.profiles += probe.profiles


async def run_tasks(
    outcomes: Outcomes,
    parts: set[str],
    sizes: dict[str, int],
    directory: Path,
    pin: bool,
    profile: Path | None,
    auth: bool = False,
) -> None:
    """Handoffs and workflows, against a server with the arq worker inside."""
    env, credentials = _credentials(auth)
    with procs.redis_server(directory) as redis:
        async with procs.agentpost_server(
            redis.target, directory, pin=pin, extra_env={**env, "AGENTPOST_WORKER": "true"}
        ) as server:
            probe = Probe(
                {"server": server.pid, "client": os.getpid(), "redis": redis.pid}, profile
            )
            target = server.target
            if "handoff" in parts:
                await outcomes.attempt(
                    "handoff-offer",
                    "agentpost handoff: offer latency, 1 originator, 1 assignee",
                    handoffs.offer(
                        target,
                        count=sizes["handoff_offer"],
                        probe=probe,
                        timeout=TIMEOUT,
                        credentials=credentials,
                    ),
                )
                await outcomes.attempt(
                    "handoff-e2e",
                    f"agentpost handoff -> result, {sizes['originators']} originator loops,"
                    f" {sizes['assignees']} assignees",
                    handoffs.end_to_end(
                        target,
                        count=sizes["handoff_e2e"],
                        originators=sizes["originators"],
                        assignees=sizes["assignees"],
                        probe=probe,
                        timeout=TIMEOUT,
                        credentials=credentials,
                    ),
                )
            if "workflow" in parts:
                shapes = {
                    "workflow-chain": handoffs.chain(sizes["chain_steps"]),
                    "workflow-fan": handoffs.fan_out(sizes["fan_width"]),
                }
                for name, definition in shapes.items():
                    await outcomes.attempt(
                        name,
                        f"agentpost {name}: {len(definition['steps'])} steps,"
                        f" {sizes['assignees']} assignees",
                        handoffs.workflow(
                            target,
                            definition,
                            runs=sizes["workflow_runs"],
                            assignees=sizes["assignees"],
                            probe=probe,
                            name=name,
                            timeout=TIMEOUT,
                            credentials=credentials,
                        ),
                    )
            server.check_alive()
    outcomes.profiles += probe.profiles


async def run_ceiling(
    outcomes: Outcomes, sizes: dict[str, int], directory: Path, pin: bool, profile: Path | None
) -> None:
    async with procs.relay_server(directory, pin=pin) as relay:
        probe = Probe({"relay": relay.pid, "client": os.getpid()}, profile)
        await outcomes.attempt(
            "ceiling-one-way",
            "ceiling: raw relay one-way",
            ceiling.one_way(relay.target, count=sizes["direct"], probe=probe, timeout=TIMEOUT),
        )
        for callers in (1, 16):
            await outcomes.attempt(
                f"ceiling-echo-{callers}",
                f"ceiling: raw unary echo, {callers} caller(s)",
                ceiling.echo(
                    relay.target,
                    count=sizes[f"request_{callers}"],
                    callers=callers,
                    probe=probe,
                    name=f"ceiling-echo-{callers}",
                ),
            )
        relay.check_alive()
    outcomes.profiles += probe.profiles


async def run(args: argparse.Namespace, sizes: dict[str, int], pin: bool) -> Outcomes:
    outcomes = Outcomes()
    with procs.workdir() as directory:
        if args.parts & MESSAGING:
            await run_agentpost(
                outcomes, args.parts, sizes, directory, pin, args.profile, args.auth
            )
        if args.parts & TASKS:
            await run_tasks(outcomes, args.parts, sizes, directory, pin, args.profile, args.auth)
        if "ceiling" in args.parts:
            await run_ceiling(outcomes, sizes, directory, pin, args.profile)
    for path in outcomes.profiles:
        if path.exists():
            print(summarize(path), end="\n\n")
    return outcomes


def _credentials(auth: bool) -> tuple[dict[str, str], scenarios.Credentials]:
    """Server environment and per-agent options: a JWT secret and one token per agent."""
    if not auth:
        return {}, scenarios.no_credentials
    from agentpost_server.auth import jwts
    from agentpost_server.core.auth import Principal

    secret = secrets.token_urlsafe(32)

    def credentials(agent_id: str) -> ConnectOptions:
        principal = Principal(
            agent_id=agent_id,
            roles=frozenset({"broadcast"}),
            capabilities=frozenset({"*"}),
            publish=(">",),
            subscribe=(">",),
        )
        return ConnectOptions(token=jwts.create(secret, principal, 3600))

    return {"AGENTPOST_JWT_SECRET": secret}, credentials


def _progress(what: str) -> None:
    print(f"... {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    pin = not args.no_pin and procs.can_pin()
    if pin:
        procs.pin_self()  # before grpc starts its threads: they inherit the affinity
    sizes = QUICK if args.quick else FULL
    started = time.monotonic()
    try:
        outcomes = asyncio.run(run(args, sizes, pin))
    except procs.BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    results, failures = outcomes.results, outcomes.failures
    info = machine(pin)
    placement = (
        f"server/relay on core {procs.SERVER_CORE}, clients on core {procs.CLIENT_CORE},"
        " redis unpinned"
        if pin
        else "processes not pinned"
    )
    header = (
        f"agentpost bench: {info['cpus']} cpus, Python {info['python']}, grpcio {info['grpcio']},"
        f" {placement}; {time.monotonic() - started:.0f}s"
    )
    print(table(results, sizes, header, failures))
    write_json(args.json, results, sizes, info, failures)
    print(f"\nJSON: {args.json}")
    return 0 if not failures and all(run.complete for run in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
