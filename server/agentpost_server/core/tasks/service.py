"""Task handoffs: the operations behind the Handoff, GetTask, WatchTask, CancelTask, UpdateTask
and ListTasks RPCs, and the worker's checks.

Each operation reads the task, decides with `core.tasks.lifecycle` and commits with a
compare-and-set on the task's version (retried on a conflict). The fast path runs in the server
that took the call: a handoff to an online target is offered at once (one Redis round trip to
read candidates, one to commit). The arq worker only keeps time: the jobs a commit schedules
(`tick`) notice offers not accepted, assignees gone quiet, backoffs that elapsed and deadlines.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from agentpost.errors import (
    AgentNotFoundError,
    AgentpostError,
    InvalidArgumentError,
    PayloadTooLargeError,
    PermissionDeniedError,
    TaskNotFoundError,
)
from agentpost.v1 import tasks_pb2
from agentpost_server.core import names
from agentpost_server.core.background import Background
from agentpost_server.core.follow import Follow
from agentpost_server.core.ids import UlidFactory
from agentpost_server.core.ports import Job, PresenceStore, TaskStore
from agentpost_server.core.tasks import lifecycle
from agentpost_server.core.tasks.lifecycle import TaskConfig, task_view
from agentpost_server.core.tasks.model import (
    CANCELED,
    EXPIRED,
    INPUT_REQUIRED,
    OFFERED,
    REJECTED,
    SERVER_ACTOR,
    SUBMITTED,
    TERMINAL,
    WORKING,
    Change,
    Committed,
    TaskRecord,
)

log = logging.getLogger(__name__)

MAX_TITLE = 200
MAX_PRIORITY = 1000
MAX_ATTEMPTS = 100
MAX_ACCEPT_MS = 86_400_000
MAX_REFERENCES = 64
_CONFLICT_RETRIES = 8
K = tasks_pb2.TaskEventKind


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class TaskService:
    def __init__(
        self,
        store: TaskStore,
        presence: PresenceStore,
        ids: UlidFactory,
        wake: Callable[[str], None],
        config: TaskConfig,
        *,
        max_payload_bytes: int,
    ) -> None:
        self.store = store
        self._presence = presence
        self._ids = ids
        self._wake = wake
        self.config = config
        self._max_payload = max_payload_bytes
        self._follow: Follow[tasks_pb2.TaskEvent] = Follow()
        self._background = Background()
        # Told about every event of a task that belongs to a workflow run (best effort: the
        # durable path is the task's on_done job).
        self.observer: Callable[[TaskRecord, tasks_pb2.TaskEvent], Awaitable[None]] | None = None

    # -- originator ---------------------------------------------------------------------------

    async def handoff(
        self,
        originator: str,
        spec: tasks_pb2.TaskSpec,
        idempotency_key: str = "",
        *,
        workflow_run_id: str = "",
        workflow_step_id: str = "",
        workflow_attempt: int = 0,
        on_done: str = "",
        avoid: Sequence[str] = (),
    ) -> tuple[tasks_pb2.Task, bool]:
        """Store a new task and offer it at once when an assignee is online. Returns the task
        and whether the idempotency key matched an earlier handoff (whose task it returns).
        `avoid`: agents to offer it to only when no other capable agent is online."""
        now = _now_ms()
        record = await self._validate(originator, spec, idempotency_key, now)
        record.workflow_run_id, record.workflow_step_id = workflow_run_id, workflow_step_id
        record.workflow_attempt = workflow_attempt
        record.on_done = on_done
        record.tried = list(avoid)
        change = lifecycle.create(record, self.config, now)
        idem = (originator, idempotency_key) if idempotency_key else None
        result = await self.store.commit(record.id, -1, change, idempotency=idem)
        if isinstance(result, str):
            earlier = await self.store.load(result)
            if earlier is None:
                raise TaskNotFoundError(
                    f"the idempotency key names task {result}, which no longer exists",
                    metadata={"task_id": result},
                )
            return task_view(earlier), True
        if isinstance(result, Committed):
            await self._after(record, change, result)
        stored = result.record if isinstance(result, Committed) else None
        if stored is None:  # pragma: no cover - just committed
            raise TaskNotFoundError(f"task {record.id} vanished", metadata={"task_id": record.id})
        offered = await self.dispatch(stored)
        return task_view(offered or stored), False

    async def get(self, caller: str, admin: bool, task_id: str, history: bool) -> tasks_pb2.Task:
        record = await self._visible(caller, admin, task_id)
        events = await self.store.history(task_id, 0, 10_000) if history else None
        return task_view(record, history=events)

    async def watch(
        self, caller: str, admin: bool, task_id: str, after_seq: int
    ) -> AsyncIterator[list[tasks_pb2.TaskEvent]]:
        """The task's events after `after_seq`, as they happen; ends after the terminal one."""
        await self._visible(caller, admin, task_id)

        async def read(after: int) -> list[tasks_pb2.TaskEvent]:
            return await self.store.history(task_id, after, 1000)

        async def finished(after: int) -> bool:
            record = await self.store.load(task_id)
            return record is None or (record.state in TERMINAL and after >= record.seq)

        async for events in self._follow.stream(
            task_id,
            after_seq,
            read=read,
            position=lambda event: event.seq,
            ends=lambda event: event.state in TERMINAL,
            finished=finished,
        ):
            yield events

    async def cancel(self, caller: str, admin: bool, task_id: str, reason: str) -> tasks_pb2.Task:
        def decide(record: TaskRecord, now: int) -> Change:
            lifecycle.check_cancel(record, caller, admin)
            why = reason.strip()[:500] or f"canceled by {caller}"
            return lifecycle.end(record, CANCELED, caller, why, now, self._ids.new())

        return task_view(await self._transition(task_id, decide))

    async def list_tasks(
        self,
        caller: str,
        admin: bool,
        *,
        dead: bool,
        states: Sequence[int],
        originator: str,
        assignee: str,
        limit: int,
    ) -> list[tasks_pb2.Task]:
        limit = min(max(limit or 100, 1), 1000)
        wanted = set(states)
        found: list[tasks_pb2.Task] = []
        offset = 0
        while len(found) < limit and offset < 20_000:
            ids = await self.store.ids("dead" if dead else "all", 500, offset)
            if not ids:
                break
            offset += len(ids)
            for record in await self.store.load_many(ids):
                if wanted and record.state not in wanted:
                    continue
                if originator and record.originator != originator:
                    continue
                if assignee and record.assignee != assignee:
                    continue
                if not admin and caller not in (record.originator, record.assignee):
                    continue
                found.append(task_view(record))
                if len(found) >= limit:
                    break
        return found

    # -- assignee -----------------------------------------------------------------------------

    async def update(
        self, caller: str, admin: bool, request: tasks_pb2.UpdateTaskRequest
    ) -> tasks_pb2.Task:
        action = request.WhichOneof("action")
        attempt = request.attempt
        if action is None:
            raise InvalidArgumentError(
                "set one action: accept, reject, progress, request_input, complete, fail or input",
                metadata={"field": "action"},
            )
        if attempt < 0:
            raise InvalidArgumentError(
                "attempt must not be negative", metadata={"field": "attempt"}
            )
        self._check_size(request.ByteSize(), "the update")
        cfg = self.config

        def decide(record: TaskRecord, now: int) -> Change:
            if action == "accept":
                return lifecycle.accept(record, caller, attempt, cfg, now)
            if action == "reject":
                lifecycle.check_assignee(record, caller, attempt, "rejected")
                lifecycle.require(record, frozenset({OFFERED}), "reject")
                why = request.reject.reason.strip()[:500] or "no reason given"
                return lifecycle.release(
                    record,
                    caller,
                    f"rejected by {caller}: {why}",
                    cfg,
                    now,
                    self._ids.new(),
                    rejected=True,
                    immediate=True,
                )
            if action == "progress":
                p = request.progress
                percent = p.percent if p.has_percent else -1
                if p.has_percent and not 0 <= percent <= 100:
                    raise InvalidArgumentError(
                        "percent must be between 0 and 100", metadata={"field": "progress.percent"}
                    )
                return lifecycle.progress(record, caller, attempt, p.message[:2000], percent, now)
            if action == "request_input":
                r = request.request_input
                payload = r.payload if r.HasField("payload") else None
                return lifecycle.request_input(
                    record, caller, attempt, r.message[:2000], payload, now
                )
            if action == "complete":
                return lifecycle.complete(record, caller, attempt, request.complete.result, now)
            if action == "fail":
                f = request.fail
                lifecycle.check_assignee(record, caller, attempt, "failed")
                lifecycle.require(record, frozenset({WORKING, INPUT_REQUIRED}), "fail")
                why = f"failed by {caller}: {f.message.strip()[:500] or 'no reason given'}"
                return lifecycle.release(
                    record, caller, why, cfg, now, self._ids.new(), retryable=f.retryable
                )
            # input: the originator's answer
            return lifecycle.provide_input(
                record, caller, admin, request.input.payload, now, self._ids.new()
            )

        record = await self._transition(request.task_id, decide)
        if record.state == SUBMITTED and record.not_before_ms <= _now_ms():
            record = await self.dispatch(record) or record
        return task_view(record)

    # -- offering -----------------------------------------------------------------------------

    async def dispatch(self, record: TaskRecord | None, task_id: str = "") -> TaskRecord | None:
        """Offer a submitted task to an assignee, or queue it until one is online. Returns the
        task as stored afterwards (None if it is gone or was not submitted)."""
        for _ in range(_CONFLICT_RETRIES):
            if record is None:
                record = await self.store.load(task_id)
            if record is None or record.state != SUBMITTED:
                return record
            now = _now_ms()
            if record.deadline_ms and now >= record.deadline_ms:
                change = lifecycle.end(
                    record, EXPIRED, SERVER_ACTOR, "the deadline passed", now, self._ids.new()
                )
            elif record.not_before_ms > now:
                return record
            else:
                candidates, refusers = await self._candidates(record)
                chosen = await self._pick(candidates) if candidates else None
                if chosen is not None:
                    assignee, limit = chosen
                    change = lifecycle.offer(record, assignee, now, self._ids.new())
                    if limit:
                        change.limit = (assignee, limit)
                elif candidates:  # all busy: wait for a free one
                    if record.queued:
                        return record
                    change = lifecycle.wait(record, now)
                elif refusers:
                    why = "rejected by every capable agent online: " + ", ".join(sorted(refusers))
                    change = lifecycle.end(
                        record, REJECTED, SERVER_ACTOR, why, now, self._ids.new()
                    )
                elif record.queued:
                    return record  # already waiting in its queue
                else:
                    change = lifecycle.wait(record, now)
            committed = await self.store.commit(record.id, record.version, change)
            task_id, before, record = record.id, record, None
            if isinstance(committed, Committed):
                await self._after(before, change, committed)
                return committed.record
        log.warning("task %s: gave up offering after repeated conflicts", task_id)
        return None

    async def _candidates(self, record: TaskRecord) -> tuple[list[str], list[str]]:
        """(agents to offer to, online capable agents that rejected it)."""
        if not record.by_capability:
            info = await self._presence.get_agent(record.spec.agent_id)
            return ([info.agent_id] if info is not None and info.online else []), []
        online = [
            a.agent_id for a in await self._presence.list_agents(record.spec.capability, True)
        ]
        willing = [a for a in online if a not in record.rejected_by]
        fresh = [a for a in willing if a not in record.tried]
        return (fresh or willing), [a for a in online if a in record.rejected_by]

    async def _pick(self, candidates: list[str]) -> tuple[str, int] | None:
        """The least loaded candidate with room (its `max_tasks`), ties broken at random so
        that load spreads; None when every candidate holds as many tasks as it takes."""
        limits = await self._presence.task_limits(candidates)
        if len(candidates) == 1 and not limits[0]:
            return candidates[0], 0  # the only one, and it takes any number
        loads = await self.store.loads(candidates)
        room = [
            (agent, held, limit)
            for agent, held, limit in zip(candidates, loads, limits, strict=True)
            if not limit or held < limit
        ]
        if not room:
            return None
        least = min(held for _, held, _ in room)
        agent, _, limit = random.choice([entry for entry in room if entry[1] == least])
        return agent, limit

    def on_agent_online(self, agent_id: str, capabilities: Sequence[str]) -> None:
        """An agent opened a session here: offer it what waits for it or its capabilities."""
        self._background.spawn(
            self._drain_quietly([f"a:{agent_id}", *(f"c:{c}" for c in capabilities)])
        )

    async def close(self) -> None:
        """Stop the background work (before the storage connections close)."""
        await self._background.close()

    async def _freed(self, agent_id: str) -> None:
        """The agent gave a task back: if it takes a limited number, offer it what waits."""
        try:
            if not (await self._presence.task_limits([agent_id]))[0]:
                return  # no limit: nothing waits for room on this agent
            info = await self._presence.get_agent(agent_id)
        except AgentpostError:
            return  # the sweep will do it
        if info is not None and info.online:
            await self._drain_quietly([f"a:{agent_id}", *(f"c:{c}" for c in info.capabilities)])

    async def _drain_quietly(self, queues: Sequence[str]) -> None:
        await self._drain(queues)

    async def _drain(self, queues: Sequence[str]) -> int:
        offered = 0
        for queue in queues:
            try:
                for task_id in await self.store.waiting(queue, 100):
                    record = await self.dispatch(None, task_id)
                    if record is not None and record.state == SUBMITTED:
                        break  # nobody for this queue (any more)
                    offered += 1
            except AgentpostError as exc:
                log.warning("offering waiting tasks of %s failed: %s", queue, exc)
        return offered

    async def sweep(self) -> int:
        """Worker cron: offer waiting tasks whose target came online unnoticed."""
        return await self._drain(await self.store.queues())

    # -- the worker's checks ------------------------------------------------------------------

    async def tick(self, task_id: str) -> None:
        """A scheduled check: deadline, offer timeout, backoff elapsed, assignee still there."""
        for _ in range(_CONFLICT_RETRIES):
            record = await self.store.load(task_id)
            if record is None or record.state in TERMINAL:
                return
            now = _now_ms()
            change: Change | None = None
            if record.deadline_ms and now >= record.deadline_ms:
                change = lifecycle.end(
                    record, EXPIRED, SERVER_ACTOR, "the deadline passed", now, self._ids.new()
                )
            elif record.state == SUBMITTED:
                await self.dispatch(record)
                return
            elif record.state == OFFERED:
                if now < record.offered_ms + record.accept_ms:
                    return  # an earlier check; the one at the accept deadline follows
                why = f"{record.assignee} did not accept within {record.accept_ms / 1000:g}s"
                change = lifecycle.release(
                    record, SERVER_ACTOR, why, self.config, now, self._ids.new()
                )
            else:  # working or input-required: is the assignee still there?
                change = await self._liveness(record, now)
                if change is None:
                    return
            committed = await self.store.commit(record.id, record.version, change)
            if isinstance(committed, Committed):
                await self._after(record, change, committed)
                after = committed.record
                if after is not None and after.state == SUBMITTED and after.not_before_ms <= now:
                    await self.dispatch(after)
                return

    async def _liveness(self, record: TaskRecord, now: int) -> Change | None:
        grace = self.config.offline_grace_ms
        info = await self._presence.get_agent(record.assignee)
        if info is not None and info.online:
            await self.store.schedule(
                Job(f"task:{record.id}:live:{now}", "task_tick", [record.id], now + grace)
            )
            return None
        last_seen = info.last_seen.ToMilliseconds() if info is not None else 0
        if now - last_seen < grace:
            await self.store.schedule(
                Job(f"task:{record.id}:live:{now}", "task_tick", [record.id], last_seen + grace)
            )
            return None
        why = f"{record.assignee} went offline while holding it (grace {grace / 1000:g}s)"
        return lifecycle.release(
            record, SERVER_ACTOR, why, self.config, now, self._ids.new(), immediate=True
        )

    async def _after(self, record: TaskRecord, change: Change, committed: Committed) -> None:
        """After a commit: wake the mailboxes it wrote to; offer what waits for an agent that
        has room again; tell the workflow observer."""
        for mail in change.mail:
            self._wake(mail.agent_id)
        for agent_id, delta in change.load.items():
            if delta < 0:
                self._background.spawn(self._freed(agent_id))
        if self.observer is not None and record.workflow_run_id and change.event is not None:
            event = tasks_pb2.TaskEvent()
            event.CopyFrom(change.event)
            event.seq = committed.seq
            try:
                await self.observer(record, event)
            except AgentpostError as exc:
                log.warning(
                    "workflow %s: task update not recorded: %s", record.workflow_run_id, exc
                )

    # -- watchers -----------------------------------------------------------------------------

    def notify(self, task_id: str) -> None:
        """The bus says the task has new events."""
        self._follow.notify(task_id)

    def notify_all(self) -> None:
        """The bus reconnected: notifications may have been missed."""
        self._follow.notify_all()

    # -- helpers ------------------------------------------------------------------------------

    async def _transition(
        self, task_id: str, decide: Callable[[TaskRecord, int], Change]
    ) -> TaskRecord:
        for _ in range(_CONFLICT_RETRIES):
            record = await self.store.load(task_id)
            if record is None:
                raise TaskNotFoundError(f"no task {task_id!r}", metadata={"task_id": task_id})
            change = decide(record, _now_ms())
            committed = await self.store.commit(record.id, record.version, change)
            if isinstance(committed, Committed):
                await self._after(record, change, committed)
                return committed.record or record
        raise AgentpostError(f"task {task_id} is changing too fast; retry")

    async def _visible(self, caller: str, admin: bool, task_id: str) -> TaskRecord:
        if not task_id:
            raise InvalidArgumentError("task_id is required", metadata={"field": "task_id"})
        record = await self.store.load(task_id)
        if record is None:
            raise TaskNotFoundError(f"no task {task_id!r}", metadata={"task_id": task_id})
        involved = {record.originator, record.assignee, *record.tried, *record.rejected_by}
        if not admin and caller not in involved:
            raise PermissionDeniedError(
                f"task {task_id} belongs to {record.originator}; {caller} may not see it",
                metadata={"task_id": task_id},
            )
        return record

    def _check_size(self, size: int, what: str) -> None:
        if size > self._max_payload:
            raise PayloadTooLargeError(
                f"{what} is {size} bytes; the limit is {self._max_payload}",
                metadata={"limit_bytes": str(self._max_payload)},
            )

    async def _validate(
        self, originator: str, spec: tasks_pb2.TaskSpec, idempotency_key: str, now: int
    ) -> TaskRecord:
        target = spec.WhichOneof("target")
        if target == "agent_id":
            agent_id = names.check_agent_id(spec.agent_id, "spec.agent_id")
            if await self._presence.online(agent_id) is None:
                raise AgentNotFoundError(
                    f"no agent {agent_id!r} is known: it never connected and was not registered",
                    metadata={"agent_id": agent_id},
                )
        elif target == "capability":
            names.check_capabilities([spec.capability])
        else:
            raise InvalidArgumentError(
                "spec needs a target: agent_id or capability", metadata={"field": "spec.target"}
            )
        title = spec.title.strip()
        if not 1 <= len(title) <= MAX_TITLE:
            raise InvalidArgumentError(
                f"spec.title must be 1-{MAX_TITLE} characters", metadata={"field": "spec.title"}
            )
        if not -MAX_PRIORITY <= spec.priority <= MAX_PRIORITY:
            raise InvalidArgumentError(
                f"spec.priority must be between -{MAX_PRIORITY} and {MAX_PRIORITY}",
                metadata={"field": "spec.priority"},
            )
        if len(spec.references) > MAX_REFERENCES:
            raise InvalidArgumentError(
                f"spec.references has more than {MAX_REFERENCES} entries",
                metadata={"field": "spec.references"},
            )
        if len(idempotency_key) > 128:
            raise InvalidArgumentError(
                "idempotency_key is longer than 128 characters",
                metadata={"field": "idempotency_key"},
            )
        self._check_size(spec.ByteSize(), "the task")
        deadline_ms = 0
        if spec.HasField("deadline"):
            deadline_ms = spec.deadline.ToMilliseconds()
            if deadline_ms <= now:
                raise InvalidArgumentError(
                    "spec.deadline is in the past", metadata={"field": "spec.deadline"}
                )
        accept_ms = self.config.accept_ms
        if spec.HasField("accept_timeout"):
            accept_ms = spec.accept_timeout.ToMilliseconds()
            if not 0 < accept_ms <= MAX_ACCEPT_MS:
                raise InvalidArgumentError(
                    "spec.accept_timeout must be between 1 ms and 24 h",
                    metadata={"field": "spec.accept_timeout"},
                )
        max_attempts = spec.max_attempts or self.config.max_attempts
        if not 1 <= max_attempts <= MAX_ATTEMPTS:
            raise InvalidArgumentError(
                f"spec.max_attempts must be between 1 and {MAX_ATTEMPTS}",
                metadata={"field": "spec.max_attempts"},
            )
        clean = tasks_pb2.TaskSpec()
        clean.CopyFrom(spec)
        clean.title = title
        clean.ClearField("accept_timeout")
        clean.max_attempts = max_attempts
        return TaskRecord(
            id=self._ids.new(),
            version=-1,
            seq=0,
            originator=originator,
            state=SUBMITTED,
            spec=clean,
            max_attempts=max_attempts,
            accept_ms=accept_ms,
            deadline_ms=deadline_ms,
            created_ms=now,
        )
