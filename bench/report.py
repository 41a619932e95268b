"""The figures as a table (with targets, ceilings and reference points) and as JSON."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.stats import Run

#: Other systems measured on this kind of 2-core machine (from the issue).
REFERENCES = {
    "direct": "AutoGen gRPC 1,700/s; raw relay ~4,000/s",
    "request-1": "AutoGen gRPC 500/s",
    "request-16": "AutoGen gRPC 1,100/s",
}


#: What the handoff and workflow figures time, exactly (printed under the table, and in the JSON).
MEASURES = {
    "handoff-offer": "handoff offer: handoff(capability=...) called to the offer coming out of"
    " the assignee's tasks() loop; one handoff at a time (the next once the offer arrived), the"
    " assignee accepting and completing each meanwhile",
    "handoff-e2e": "handoff -> result: handoff() called to result() returned, the assignees"
    " accepting and completing at once (handle_tasks)",
    "workflow-chain": "workflow: coordinate() called to result() returned, runs one at a time;"
    " per step = run p50 / steps; every step's agent answers at once",
    "workflow-fan": "fan-out/fan-in: one root, the parallel steps after it, one join after them"
    " all; timed like the chain",
}

#: "other" CPU (% of a core, everything but our processes) above which figures are flagged.
DISTURBED_PERCENT = 20.0


@dataclass(frozen=True)
class Row:
    label: str
    unit: str
    value: Callable[[Run], float]
    target: Callable[[float], bool] | None = None
    target_text: str = ""
    reference: str = ""


@dataclass(frozen=True)
class Section:
    key: str  # agentpost result name
    ceiling: str  # ceiling result name ("" for none)
    title: str
    rows: tuple[Row, ...]


def _rate(run: Run) -> float:
    return run.rate


def _p50(run: Run) -> float:
    return run.p50_ms


def _p99(run: Run) -> float:
    return run.p99_ms


def _max(run: Run) -> float:
    return run.max_ms


def _step_p50(run: Run) -> float:
    return run.step_p50_ms


def sections(sizes: dict[str, int]) -> list[Section]:
    return [
        Section(
            "direct",
            "ceiling-one-way",
            f"direct one-way: {sizes['direct']:,} x 256 B, {sizes['window']:,} sends in flight",
            (
                Row(
                    "throughput",
                    "msgs/s",
                    _rate,
                    lambda v: v >= 8_000,
                    ">= 8,000",
                    REFERENCES["direct"],
                ),
                Row("latency p50", "ms", _p50),
                Row("latency p99", "ms", _p99),
            ),
        ),
        Section(
            "request-1",
            "ceiling-echo-1",
            f"request/response, 1 caller: {sizes['request_1']:,} requests",
            (
                Row("round trips", "req/s", _rate, reference=REFERENCES["request-1"]),
                Row("latency p50", "ms", _p50, lambda v: v < 1.5, "< 1.5 ms"),
                Row("latency p99", "ms", _p99),
            ),
        ),
        Section(
            "request-16",
            "ceiling-echo-16",
            f"request/response, 16 callers: {sizes['request_16']:,} requests",
            (
                Row(
                    "round trips",
                    "req/s",
                    _rate,
                    lambda v: v >= 2_500,
                    ">= 2,500",
                    REFERENCES["request-16"],
                ),
                Row("latency p50", "ms", _p50),
                Row("latency p99", "ms", _p99),
            ),
        ),
        Section(
            "broadcast",
            "",
            f"broadcast to {sizes['agents']} agents: call to last arrival,"
            f" {sizes['rounds']} rounds",
            (Row("fan-out p50", "ms", _p50), Row("fan-out max", "ms", _max)),
        ),
        Section(
            "handoff-offer",
            "",
            f"handoff offer: {sizes['handoff_offer']:,} handoffs by capability, one at a time,"
            " 1 assignee",
            (
                Row("offers", "offers/s", _rate),
                Row("offer latency p50", "ms", _p50),
                Row("offer latency p99", "ms", _p99),
                Row("offer latency max", "ms", _max),
            ),
        ),
        Section(
            "handoff-e2e",
            "",
            f"handoff -> result: {sizes['handoff_e2e']:,} tasks, {sizes['originators']}"
            f" originator loops, {sizes['assignees']} assignees",
            (
                Row("tasks", "tasks/s", _rate),
                Row("latency p50", "ms", _p50),
                Row("latency p99", "ms", _p99),
            ),
        ),
        Section(
            "workflow-chain",
            "",
            f"workflow, {sizes['chain_steps']}-step chain: {sizes['workflow_runs']} runs,"
            f" {sizes['assignees']} assignees",
            (
                Row("per step p50", "ms/step", _step_p50),
                Row("run p50", "ms", _p50),
                Row("run max", "ms", _max),
            ),
        ),
        Section(
            "workflow-fan",
            "",
            f"workflow, {sizes['fan_width']}-way fan-out/fan-in ({sizes['fan_width'] + 2} steps):"
            f" {sizes['workflow_runs']} runs",
            (
                Row("per step p50", "ms/step", _step_p50),
                Row("run p50", "ms", _p50),
                Row("run max", "ms", _max),
            ),
        ),
    ]


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cpu(run: Run) -> str:
    return ", ".join(f"{name} {pct:.0f}%" for name, pct in run.cpu.items())


def table(
    results: dict[str, Run], sizes: dict[str, int], header: str, failures: dict[str, str]
) -> str:
    """The human-readable report: one block per pattern that ran."""
    head = f"{'':28}{'agentpost':>11}{'ceiling':>11}{'ratio':>8}  {'target':<16}reference"
    lines = [header, "", head, "-" * len(head)]
    for section in sections(sizes):
        run = results.get(section.key)
        ceiling = results.get(section.ceiling) if section.ceiling else None
        failed = [
            (name, failures[name]) for name in (section.key, section.ceiling) if name in failures
        ]
        if run is None and ceiling is None and not failed:
            continue
        lines.append(section.title)
        for name, reason in failed:
            lines.append(f"  FAILED ({name}): {reason}")
        for row in section.rows:
            mine = row.value(run) if run is not None else None
            theirs = row.value(ceiling) if ceiling is not None else None
            ratio = f"{mine / theirs:.2f}x" if mine is not None and theirs else "-"
            target = ""
            if row.target is not None and mine is not None:
                target = f"{row.target_text} {'ok' if row.target(mine) else 'MISS'}"
            name = f"  {row.label} ({row.unit})"
            lines.append(
                f"{name:<28}{_number(mine) if mine is not None else '-':>11}"
                f"{_number(theirs) if theirs is not None else '-':>11}{ratio:>8}  "
                f"{target:<16}{row.reference}"
            )
        for label, measured in (("agentpost", run), ("ceiling", ceiling)):
            if measured is None:
                continue
            note = "" if measured.complete else f"  INCOMPLETE: {measured.count:,} of"
            note += f" {measured.expected:,}" if not measured.complete else ""
            lines.append(f"  cpu ({label}): {_cpu(measured) or 'n/a'}{note}")
        lines.append("")
    busiest = max((run.cpu.get("other", 0.0) for run in results.values()), default=0.0)
    if busiest > DISTURBED_PERCENT:
        lines.append(
            f"WARNING: other processes used up to {busiest:.0f}% of a core during a measurement;"
            " the figures are disturbed (run again on a quiet machine)."
        )
    for name, text in MEASURES.items():
        if name in results or name in failures:
            lines.append(f"{text}.")
    lines.append("direct latency includes queueing behind the sends in flight (window / rate).")
    lines.append(
        "ratio = agentpost / ceiling (throughput: higher is better; latency: lower is better)."
    )
    lines.append("ceiling = raw grpc.aio relay (python -m bench.relay): no Redis, one message")
    lines.append("per gRPC frame; request rows compare with a unary Echo. cpu = % of one core.")
    return "\n".join(lines)


def machine(pinned: bool) -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
        "pinned": pinned,
    }


def write_json(
    path: Path,
    results: dict[str, Run],
    sizes: dict[str, int],
    info: dict[str, Any],
    failures: dict[str, str],
) -> None:
    document = {
        "machine": info,
        "sizes": sizes,
        "results": {name: run.to_json() for name, run in results.items()},
        "failures": failures,
        "targets": {
            "direct_msgs_per_s": 8_000,
            "request_1_p50_ms": 1.5,
            "request_16_per_s": 2_500,
        },
        "references": REFERENCES,
        "measures": {name: text for name, text in MEASURES.items() if name in results},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
