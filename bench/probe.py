"""Around each measured stretch: the CPU each process used and, with `--profile DIR`, a py-spy
profile of the server and of this (client) process, summarised as the top functions."""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import CpuMeter

_PY_SPY_RATE = "250"


def find_py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


@dataclass
class Probe:
    """`begin(name)` before a measured stretch, `end()` after: CPU % per process, profiles."""

    pids: dict[str, int]
    profile_dir: Path | None = None
    profiles: list[Path] = field(default_factory=list)
    _meter: CpuMeter | None = None
    _spies: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def begin(self, name: str) -> None:
        if self.profile_dir is not None:
            self._start_spies(name)
        self._meter = CpuMeter(self.pids)
        self._meter.start()

    def end(self) -> dict[str, float]:
        usage = self._meter.stop() if self._meter is not None else {}
        self._meter = None
        for spy in self._spies:
            spy.send_signal(signal.SIGINT)
        for spy in self._spies:
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        self._spies = []
        return usage

    def _start_spies(self, name: str) -> None:
        assert self.profile_dir is not None
        binary = find_py_spy()
        if binary is None:
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        for who, pid in self.pids.items():
            if who == "redis":
                continue
            out = self.profile_dir / f"{name}-{who}.txt"
            argv = [binary, "record", "--pid", str(pid), "--rate", _PY_SPY_RATE]
            argv += ["--format", "raw", "--output", str(out), "--nonblocking"]
            self._spies.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            self.profiles.append(out)
        time.sleep(0.5)  # let py-spy attach before the stretch starts


def summarize(collapsed: Path, top: int = 15) -> str:
    """The functions with the most samples in a py-spy `--format raw` file: self and total."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_short(frame) for frame in stack.split(";")]
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return f"{collapsed.name}: no samples"
    lines = [f"{collapsed.name}: {samples} samples", "  self%  total%  function"]
    for frame, count in own.most_common(top):
        lines.append(
            f"  {100 * count / samples:5.1f}  {100 * total[frame] / samples:6.1f}  {frame}"
        )
    return "\n".join(lines)


def _short(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `func (module.py)`: one entry per function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({short})"
