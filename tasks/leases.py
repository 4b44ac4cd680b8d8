"""Task leases: a claim holds its task for TASK_LEASE_SECONDS, renewed while the claiming
process lives; Beat re-queues a task whose lease ran out (docs/CONCURRENCY.md)."""

import logging

import structlog
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from orchestrator_project import metrics
from sessions.models import ACTIVE, Session

from . import statements
from .models import Task
from .release import ask_to_abort, leave_canvas, release_dependents, send_released

logger = logging.getLogger(__name__)
log = structlog.get_logger(__name__)


def renew_leases(agent_id: int | None = None) -> int:
    """Extend the leases of the running tasks whose claiming process is alive: its agent beats
    and listed it at its last beat. One agent's (its heartbeat), or every agent's (Beat)."""
    params = {
        "lease": settings.TASK_LEASE_SECONDS,
        "offline_after": settings.AGENT_OFFLINE_AFTER_SECONDS,
        "agent": agent_id,
    }
    return len(statements.run(statements.RENEW_LEASES, params))


def reap_expired_leases() -> dict[str, int]:
    """Renew the leases of live holders, then recover every running task whose lease ran out
    (the process that claimed it died). Every step is a compare-and-set on the task row, so a
    second Beat or a repeated sweep recovers nothing twice."""
    renew_leases()
    done = {"requeued": 0, "orphaned": 0, "cancelled": 0}
    now = timezone.now()
    expired = Task.objects.filter(status=Task.Status.RUNNING, lease_expires_at__lt=now).select_related(
        "session", "agent"
    )
    for task in expired:
        who = f"agent {task.agent.name}" if task.agent else "an agent that is gone"
        lost = f"the lease of attempt {task.attempts} on {who} expired (its worker process died)"
        outcome = recover_lost_task(task, lost, lease_expires_at__lt=now)
        if outcome in done:
            done[outcome] += 1
    return done


def recover_lost_task(task: Task, lost: str, **as_read) -> str | None:
    """Take back a running task whose run was lost (`lost` says how): re-queued for another
    attempt, or, with its attempts used up, failed and its session orphaned; cancelled if its
    session has ended meanwhile. The recovery says why in the session's event log.

    Compare-and-set on the task's status and attempt (and `as_read`, more conditions the caller
    read it under): returns what was done ("requeued", "orphaned", "failed" when the session
    was paused or orphaned already, "cancelled"), or None if the task had moved on."""
    now = timezone.now()
    claim = Task.objects.filter(pk=task.pk, status=Task.Status.RUNNING, attempts=task.attempts, **as_read)
    session = task.session
    outcome = note = None
    if session.status not in ACTIVE | {Session.Status.PAUSED}:
        if claim.update(
            status=Task.Status.CANCELLED, finished_at=now, lease_expires_at=None, error=f"{lost}; {session.status}"
        ):
            outcome, note = "cancelled", f"task {task.key}: {lost}; cancelled, the session is {session.status}"
    elif task.attempts < task.max_attempts:
        with transaction.atomic():
            if claim.update(
                status=Task.Status.QUEUED, queued_at=now, lease_expires_at=None, worker_pid=None, error=lost
            ):
                leave_canvas(task)
                send_released([task.pk], again=True)
                outcome, note = "requeued", f"task {task.key}: {lost}; re-queued"
    else:
        error = f"gave up after {task.attempts} attempts: {lost}"
        with transaction.atomic():
            if claim.update(status=Task.Status.FAILED, finished_at=now, lease_expires_at=None, error=error):
                # What RECORD does with a finish: one upstream fewer for each pending dependent.
                Task.objects.filter(depends_on=task.pk, status=Task.Status.PENDING).update(
                    upstream_open=F("upstream_open") - 1
                )
                outcome = "failed"
        if outcome:
            reason = f"task {task.key} lost: {lost}, and its {task.max_attempts} attempts are used up"
            if session.transition(Session.Status.ORPHANED, reason=reason, actor="beat", only_from=ACTIVE):
                outcome = "orphaned"
            else:  # paused, or orphaned by another lost task: what follows is released as after a failure
                task.status = Task.Status.FAILED
                release_dependents(task)
                note = f"{reason}; failed"
    if note:
        session.note(note, actor="beat")
    if outcome:
        _report_recovery(task, outcome, lost)
        # The lost run may still be going on a host we cannot reach: once it can hear us, it
        # stops before it does more (its outcome would be refused anyway: its attempt is stale).
        ask_to_abort([(task.pk, task.attempts)], f"attempt {task.attempts} was taken back: {lost}")
    return outcome


def _report_recovery(task: Task, outcome: str, lost: str) -> None:
    """task.requeued, or task.finished as failed or cancelled, logged and counted (the
    session's own line says when it was orphaned). A cancelled task's session had ended; a
    failed one's agent lost it, with the attempts used up."""
    event, status = ("task.requeued", None) if outcome == "requeued" else ("task.finished", outcome)
    if outcome == "orphaned":
        status = Task.Status.FAILED
    log.warning(
        event,
        task_id=str(task.pk),
        task_key=task.key,
        session_id=str(task.session_id),
        tenant=task.session.tenant_id,
        outcome=status,
        recovery=outcome,
        attempt=task.attempts,
        reason=lost,
    )
    if status is not None:
        cause = "user" if status == Task.Status.CANCELLED else "agent"
        executor = task.agent.executor if task.agent else "none"
        metrics.TASKS_FINISHED.labels(task.capability, executor, status, cause).inc()


def recover_tasks_of(agent, why: str) -> int:
    """Take back every task `agent` is running (it went silent, or its worker started again):
    `why` says what happened, and each task's lost attempt is added to it. Returns how many."""
    running = Task.objects.filter(agent=agent, finished_at__isnull=True, status=Task.Status.RUNNING)
    return sum(
        1 for task in running.select_related("session") if recover_lost_task(task, f"{why} attempt {task.attempts}")
    )
