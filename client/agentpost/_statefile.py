"""What an agent keeps on disk between runs (`ConnectOptions.state_path`): its instance id and
the ids of the messages it handled most recently.

    {"format": 1, "agent_id": "coder", "instance_id": "3f2c...", "handled": ["01J...", ...]}

Why these two. A restarted agent that introduces itself with its old instance id takes over the
deliveries its previous run had not acknowledged, and gets them first, in order. Some of those
may have been handled just before the process died, their acknowledgement still unsent: the
kept ids let the new run drop them (and acknowledge them) instead of handling them twice. Only
messages whose acknowledgement was still in doubt can come back, so the newest `KEPT_IDS`
acknowledged ids are enough; the file stays small (about 30 bytes per id). With the default
`ack_mode`, an id is recorded when the message is acknowledged, after the loop body ran: a
message whose handler was interrupted by a crash is shown again.

How. The file is rewritten whole, atomically (a temporary file in the same directory, fsync,
`os.replace`), in a worker thread, at most every `SAVE_INTERVAL` while acknowledgements happen,
once at connect (so the instance id survives a crash before the first ack) and on close. While
an agent runs, a lock (`<state_path>.lock`, `fcntl.flock`; not on Windows) keeps a second
process from using the same file, which would make two live sessions claim one instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from agentpost.errors import InvalidArgumentError

if sys.platform != "win32":
    import fcntl

__all__ = ["KEPT_IDS", "SAVE_INTERVAL", "StateFile", "StateKeeper"]

logger = logging.getLogger(__name__)

#: The most acknowledged message ids the file keeps (the newest ones).
KEPT_IDS = 10_000
#: The shortest time between two writes while acknowledgements happen, in seconds.
SAVE_INTERVAL = 0.1
_FORMAT = 1


class StateFile:
    """One agent's state file: `open()` locks and reads it, `save()` replaces it atomically."""

    def __init__(self, path: str | os.PathLike[str], agent_id: str) -> None:
        self.path = Path(os.fspath(path))
        self.agent_id = agent_id
        self._lock_file: IO[bytes] | None = None
        self._write_lock = threading.Lock()
        self._written = -1

    def open(self) -> tuple[str | None, list[str]]:
        """Lock the file and read it: the kept instance id (None for a new file) and handled ids.

        Raises `InvalidArgumentError` if the file is in use, unreadable, or another agent's.
        """
        try:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._lock()
            except OSError as exc:
                raise _invalid(self.path, exc.strerror or str(exc), corrupt=False) from None
            return self._read()
        except BaseException:
            self.close()
            raise

    def save(self, generation: int, instance_id: str, handled: list[str]) -> None:
        """Replace the file with this state, unless a later `generation` was written already.

        Thread-safe. Raises `OSError`.
        """
        data = json.dumps(
            {
                "format": _FORMAT,
                "agent_id": self.agent_id,
                "instance_id": instance_id,
                "handled": handled,
            },
            separators=(",", ":"),
        ).encode()
        with self._write_lock:
            if generation <= self._written:
                return
            _replace_atomically(self.path, data)
            self._written = generation

    def close(self) -> None:
        """Release the lock (idempotent)."""
        lock_file, self._lock_file = self._lock_file, None
        if lock_file is not None:
            lock_file.close()  # closing the descriptor releases the flock

    def _lock(self) -> None:
        if sys.platform == "win32":
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_file = self._lock_file = open(lock_path, "ab")  # noqa: SIM115 (held while running)
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidArgumentError(
                f"state file {self.path} is in use by another agent (each agent instance "
                "needs its own state_path)",
                metadata={"field": "state_path"},
            ) from None

    def _read(self) -> tuple[str | None, list[str]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, []
        except OSError as exc:
            raise _invalid(self.path, exc.strerror or str(exc), corrupt=False) from None
        try:
            state: Any = json.loads(text)
        except ValueError:
            raise _invalid(self.path, "not JSON") from None
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise _invalid(self.path, f"not an agentpost state file (format {_FORMAT})")
        instance_id, handled = state.get("instance_id"), state.get("handled")
        if not (isinstance(instance_id, str) and instance_id and isinstance(handled, list)):
            raise _invalid(self.path, "instance_id or handled is missing")
        if state.get("agent_id") != self.agent_id:
            raise InvalidArgumentError(
                f"state file {self.path} belongs to agent {state.get('agent_id')!r}, "
                f"not {self.agent_id!r}",
                metadata={"field": "state_path"},
            )
        return instance_id, [item for item in handled if isinstance(item, str)]


class StateKeeper:
    """Writes a `StateFile` when the state changed, at most every `SAVE_INTERVAL`, off the loop.

    `snapshot()` gives the state to write (instance id, handled ids); call `changed()` after
    every change, run `run()` as a task, and `flush()` once at the end.
    """

    def __init__(self, file: StateFile, snapshot: Callable[[], tuple[str, list[str]]]) -> None:
        self.file = file
        self._snapshot = snapshot
        self._dirty = asyncio.Event()
        self._generation = 0

    def changed(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self._generation += 1
            instance_id, handled = self._snapshot()
            try:
                await asyncio.to_thread(self.file.save, self._generation, instance_id, handled)
            except OSError as exc:
                logger.warning("cannot write the state file %s: %s", self.file.path, exc)
            await asyncio.sleep(SAVE_INTERVAL)

    def flush(self) -> None:
        """Write the state now, in this thread (for connect and close). Raises `OSError`."""
        self._generation += 1
        instance_id, handled = self._snapshot()
        self.file.save(self._generation, instance_id, handled)


def _replace_atomically(path: Path, data: bytes) -> None:
    descriptor, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if sys.platform != "win32":  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _invalid(path: Path, why: str, *, corrupt: bool = True) -> InvalidArgumentError:
    hint = " (delete it to start afresh)" if corrupt else ""
    return InvalidArgumentError(
        f"cannot use state file {path}: {why}{hint}", metadata={"field": "state_path"}
    )
