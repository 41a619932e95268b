"""A task as stored (`TaskRecord`) and a transition to store (`Change`).

Every transition is a compare-and-set on the task's version: the core reads the record, decides
(`core.tasks.lifecycle`), and the store commits the change only if nobody else changed the task
meanwhile, together with everything that must happen with it (history event, audit record,
queue and load bookkeeping, mailbox notices, follow-up jobs) in one atomic step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agentpost.v1 import envelope_pb2, payload_pb2, tasks_pb2
from agentpost_server.core.ports import Job

S = tasks_pb2.TaskState
SUBMITTED = S.TASK_STATE_SUBMITTED
OFFERED = S.TASK_STATE_OFFERED
WORKING = S.TASK_STATE_WORKING
INPUT_REQUIRED = S.TASK_STATE_INPUT_REQUIRED
COMPLETED = S.TASK_STATE_COMPLETED
FAILED = S.TASK_STATE_FAILED
REJECTED = S.TASK_STATE_REJECTED
CANCELED = S.TASK_STATE_CANCELED
EXPIRED = S.TASK_STATE_EXPIRED

OPEN = frozenset({SUBMITTED, OFFERED, WORKING, INPUT_REQUIRED})
HELD = frozenset({OFFERED, WORKING, INPUT_REQUIRED})  # states with an assignee
TERMINAL = frozenset({COMPLETED, FAILED, REJECTED, CANCELED, EXPIRED})
DEAD = frozenset({FAILED, REJECTED, EXPIRED})  # listed by `agentpost tasks --dead`

SERVER_ACTOR = "agentpost"


def state_name(state: int) -> str:
    """TASK_STATE_INPUT_REQUIRED -> "input-required"."""
    return S.Name(state).removeprefix("TASK_STATE_").lower().replace("_", "-")  # type: ignore[arg-type]


@dataclass(slots=True)
class TaskRecord:
    """The stored task (`store.tasks` parses and validates it)."""

    id: str
    version: int
    seq: int
    originator: str
    state: int
    spec: tasks_pb2.TaskSpec
    assignee: str = ""
    attempt: int = 0
    max_attempts: int = 1
    accept_ms: int = 0
    deadline_ms: int = 0
    created_ms: int = 0
    updated_ms: int = 0
    offered_ms: int = 0
    not_before_ms: int = 0
    ticks: int = 0
    queued: bool = False  # waiting in its target's queue
    result: payload_pb2.Payload | None = None
    error: str = ""
    retryable: bool = False
    tried: list[str] = field(default_factory=list)
    rejected_by: list[str] = field(default_factory=list)
    workflow_run_id: str = ""
    workflow_step_id: str = ""
    workflow_attempt: int = 0
    on_done: str = ""

    @property
    def queue(self) -> str:
        """The waiting queue of its target: "a:<agent id>" or "c:<capability>"."""
        if self.spec.WhichOneof("target") == "capability":
            return "c:" + self.spec.capability
        return "a:" + self.spec.agent_id

    @property
    def by_capability(self) -> bool:
        return self.spec.WhichOneof("target") == "capability"

    @property
    def priority(self) -> int:
        return self.spec.priority


@dataclass(slots=True)
class Mail:
    """An envelope to append to an agent's mailbox with the change."""

    agent_id: str
    envelope: envelope_pb2.Envelope
    expires_ms: int = 0


@dataclass(slots=True)
class Change:
    """One transition, committed atomically by `TaskStore.commit`."""

    fields: dict[str, str | bytes] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)  # fields to delete
    event: tasks_pb2.TaskEvent | None = None  # appended to the history (seq assigned there)
    action: str = ""  # audit action, e.g. "task.completed"; "" for none
    actor: str = SERVER_ACTOR
    details: Mapping[str, str] = field(default_factory=dict)
    enqueue: str = ""  # a waiting queue ("a:..."/"c:...") to enter, at `score`
    score: float = 0.0  # lower is offered first: see `waiting_score`
    dequeue: str = ""  # a waiting queue to leave
    load: dict[str, int] = field(default_factory=dict)  # agent id -> change in held tasks
    limit: tuple[str, int] | None = None  # commit only while this agent holds fewer tasks
    mail: list[Mail] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    terminal: bool = False  # ends the task: kept for the retention, then deleted
    dead: bool = False  # and list it among the dead tasks

    def set(self, **values: str | bytes | int | bool) -> Change:
        for name, value in values.items():
            if isinstance(value, bool):
                self.fields[name] = "1" if value else "0"
            elif isinstance(value, int):
                self.fields[name] = str(value)
            else:
                self.fields[name] = value
        return self


def waiting_score(priority: int, created_ms: int) -> float:
    """Higher priority first, then older first (unix ms stay below 2**42 until 2109)."""
    return -priority * float(1 << 42) + created_ms


@dataclass(frozen=True, slots=True)
class Committed:
    """What a commit did: the new version, the event's seq (0 without an event), and the task
    as stored afterwards (read back by the same script)."""

    version: int
    seq: int
    record: TaskRecord | None = None
