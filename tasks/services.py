"""Running one task on an agent, and settling what its outcome means for the rest of the DAG.

The database is the source of truth; a run_task message is a hint that a task may be ready.
Every hand-off is a compare-and-set on Task.status, so a duplicate or redelivered message
finds the work already taken and returns without doing anything.
"""

import logging
from datetime import timedelta

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from agents.executors import TaskContext, TaskFailed, TransientError
from agents.runtime import AgentRuntime
from sessions.locking import LockUnavailable
from sessions.models import ACTIVE, Checkpoint, Session

from .models import Task

logger = logging.getLogger(__name__)
TS = Task.Status
UNFINISHED = (TS.PENDING, TS.QUEUED, TS.RUNNING)


class RetryTask(Exception):
    """Ask Celery to deliver the same message again after `countdown` seconds (None: back off)."""

    def __init__(self, countdown: float | None, reason: str):
        super().__init__(reason)
        self.countdown = countdown


def upstream_verdict(ups: list[Task]) -> str:
    """ "blocked" if a required upstream failed, was skipped or cancelled; "ready" if every
    upstream completed (or was optional and failed or skipped); otherwise "waiting"."""
    if any(up.status == TS.CANCELLED or (up.required and up.status in (TS.FAILED, TS.SKIPPED)) for up in ups):
        return "blocked"
    if all(up.status == TS.COMPLETED or (not up.required and up.status in (TS.FAILED, TS.SKIPPED)) for up in ups):
        return "ready"
    return "waiting"


def _promote(task: Task, ups: list[Task]) -> str | None:
    """Move a pending task to queued or skipped from its upstreams' state; returns the new status."""
    verdict = upstream_verdict(ups)
    now = timezone.now()
    if verdict == "ready":
        moved = Task.objects.filter(pk=task.pk, status=TS.PENDING).update(status=TS.QUEUED, queued_at=now)
        return TS.QUEUED if moved else None
    if verdict == "blocked":
        culprit = next(up for up in ups if up.status in (TS.FAILED, TS.SKIPPED, TS.CANCELLED))
        moved = Task.objects.filter(pk=task.pk, status=TS.PENDING).update(
            status=TS.SKIPPED, finished_at=now, error=f"skipped: upstream {culprit.key} {culprit.status}"
        )
        return TS.SKIPPED if moved else None
    return None


def release_ready_tasks(session_id) -> None:
    """Queue every pending task of the session whose upstreams allow it; skip the blocked ones.

    Tasks are visited in creation order, which the API guarantees to be topological only for
    valid DAGs, so we loop until nothing changes (at most depth + 1 passes).
    """
    changed = True
    while changed:
        changed = False
        pending = Task.objects.filter(session_id=session_id, status=TS.PENDING).prefetch_related("depends_on")
        for task in pending:
            if _promote(task, list(task.depends_on.all())) is not None:
                changed = True


def settle_dependents(task: Task) -> None:
    """After `task` finished, queue or skip its direct dependents, and skips transitively."""
    stack = [task]
    while stack:
        finished = stack.pop()
        for down in finished.dependents.filter(status=TS.PENDING).prefetch_related("depends_on"):
            if _promote(down, list(down.depends_on.all())) == TS.SKIPPED:
                stack.append(down)


def execute_task(*, task_id, runtime: AgentRuntime) -> str:
    """Claim, run and record one task on this agent; returns what happened, for the log."""
    task = Task.objects.select_related("session").filter(pk=task_id).first()
    if task is None:
        return "gone"
    session = task.session
    if session.status not in ACTIVE:
        return f"session {session.status}"
    if task.status == TS.PENDING:
        verdict = _promote(task, list(task.depends_on.all()))
        if verdict == TS.SKIPPED:
            settle_dependents(task)
            return "skipped"
        if verdict is None:
            # An upstream is still running (e.g. after a resume); poll instead of waiting on it.
            raise RetryTask(countdown=None, reason="upstream still running")
    attempt = claim_task(task, runtime)
    if attempt is None:
        return "taken"
    if session.status == Session.Status.QUEUED:
        try:
            session.transition(
                Session.Status.RUNNING,
                reason=f"task {task.key} claimed by {runtime.name}",
                actor=f"agent:{runtime.name}",
                only_from=frozenset({Session.Status.QUEUED}),
            )
        except LockUnavailable:
            # The claimed task must run regardless; settle_session moves a queued session on.
            logger.warning("session %s stays queued: its lock is busy", session.pk)
    return _run_claimed(task, attempt, runtime)


def claim_task(task: Task, runtime: AgentRuntime) -> int | None:
    """queued -> running for this agent, only if nobody else claimed it.

    The filter must stay on the task row's own columns: a filter across a relation makes Django
    write `WHERE id IN (subquery)`, and PostgreSQL's re-check after waiting on the row lock does
    not re-run the subquery, so two racing claims would both win.
    """
    now = timezone.now()
    claimed = Task.objects.filter(pk=task.pk, status=TS.QUEUED).update(
        status=TS.RUNNING,
        attempts=F("attempts") + 1,
        agent_id=runtime.agent_id,
        started_at=now,
        lease_expires_at=now + timedelta(seconds=settings.TASK_DEADLINE_SECONDS),
        error="",
    )
    if not claimed:
        return None
    task.refresh_from_db(fields=["attempts", "status", "agent"])
    return task.attempts


def _run_claimed(task: Task, attempt: int, runtime: AgentRuntime) -> str:
    from agents.models import Agent

    agent = Agent(pk=runtime.agent_id)
    agent.task_started()
    succeeded = False
    try:
        ctx = TaskContext(
            task_id=str(task.pk),
            session_id=str(task.session_id),
            key=task.key,
            title=task.title,
            capability=task.capability,
            instructions=task.instructions,
            params=task.params,
            workspace=settings.WORKSPACE_ROOT / str(task.session_id),
            attempt=attempt,
            timeout_s=float(settings.TASK_DEADLINE_SECONDS),
        )
        try:
            result = runtime.executor.execute(ctx)
        except TransientError as exc:
            return _retry_or_fail(task, attempt, str(exc))
        except TaskFailed as exc:
            record_outcome(task, attempt, TS.FAILED, result=exc.result, error=str(exc))
            return "failed"
        except SoftTimeLimitExceeded:
            record_outcome(task, attempt, TS.FAILED, error=f"deadline of {ctx.timeout_s:g}s exceeded")
            return "failed"
        except Exception as exc:
            # An executor bug must not kill the canvas: record it as the task's failure.
            logger.exception("executor %s crashed on task %s", runtime.executor_kind, task.pk)
            record_outcome(task, attempt, TS.FAILED, error=f"executor error: {exc!r}")
            return "failed"
        record_outcome(task, attempt, TS.COMPLETED, result=result)
        succeeded = True
        return "completed"
    finally:
        agent.task_finished(succeeded=succeeded)


def _retry_or_fail(task: Task, attempt: int, error: str) -> str:
    if attempt >= task.max_attempts:
        record_outcome(task, attempt, TS.FAILED, error=f"gave up after {attempt} attempts: {error}")
        return "failed"
    requeued = Task.objects.filter(pk=task.pk, status=TS.RUNNING, attempts=attempt).update(
        status=TS.QUEUED, error=f"attempt {attempt} failed: {error}", lease_expires_at=None
    )
    if not requeued:
        return "taken"
    raise RetryTask(countdown=min(60.0, 2.0**attempt), reason=error)


def record_outcome(task: Task, attempt: int, status: str, *, result: dict | None = None, error: str = "") -> None:
    """running -> completed|failed for this attempt; a stale attempt (taken over) changes nothing."""
    with transaction.atomic():
        recorded = Task.objects.filter(pk=task.pk, status=TS.RUNNING, attempts=attempt).update(
            status=status, result=result or {}, error=error[:5000], finished_at=timezone.now(), lease_expires_at=None
        )
        if recorded and status == TS.COMPLETED:
            done = Task.objects.filter(session_id=task.session_id, status=TS.COMPLETED).values_list("key", flat=True)
            Checkpoint.objects.create(session_id=task.session_id, task_id=task.pk, completed_task_keys=sorted(done))
    if recorded:
        settle_dependents(task)


def settle_session(session_id) -> str | None:
    """Once no task can run any more, move an active session to its outcome."""
    session = Session.objects.get(pk=session_id)
    if session.status not in ACTIVE:
        return None
    tasks = list(Task.objects.filter(session_id=session_id).only("key", "status", "required"))
    if any(t.status in UNFINISHED for t in tasks):
        return None
    counts = task_counts(tasks)
    if any(t.required and t.status != TS.COMPLETED for t in tasks):
        outcome, reason = Session.Status.FAILED, "a required task did not complete"
    elif all(t.status == TS.COMPLETED for t in tasks):
        outcome, reason = Session.Status.COMPLETED, f"all {len(tasks)} tasks completed"
    else:
        outcome, reason = Session.Status.PARTIALLY_COMPLETED, "every required task completed; some optional did not"
    if session.status == Session.Status.QUEUED:
        session.transition(Session.Status.RUNNING, reason="settling", only_from=frozenset({Session.Status.QUEUED}))

    def store_summary(row: Session) -> None:
        row.result = {**row.result, "task_counts": counts}
        row.save(update_fields=["result"])

    event = session.transition(outcome, reason=reason, only_from=ACTIVE, effects=store_summary)
    return outcome if event else None


def task_counts(tasks) -> dict[str, int]:
    counts = dict.fromkeys(TS.values, 0)
    for task in tasks:
        counts[task.status] += 1
    return counts
