"""Task leases: a claim holds its task for TASK_LEASE_SECONDS, renewed while the claiming
process lives; Beat re-queues a task whose lease ran out (docs/CONCURRENCY.md)."""

import logging

from django.conf import settings
from django.utils import timezone

from sessions.models import ACTIVE, Session

from . import statements
from .models import Task
from .services import dispatch_task, leave_canvas

logger = logging.getLogger(__name__)
TS = Task.Status


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
    (the process that claimed it died): re-queued for another attempt, or, with its attempts
    used up, failed and its session orphaned. Each recovery says why in the session's event
    log. Every step is a compare-and-set on the task row, so a second Beat or a repeated sweep
    recovers nothing twice."""
    renew_leases()
    done = {"requeued": 0, "orphaned": 0, "cancelled": 0}
    now = timezone.now()
    expired = Task.objects.filter(status=TS.RUNNING, lease_expires_at__lt=now).select_related("session", "agent")
    for task in expired:
        who = f"agent {task.agent.name}" if task.agent else "an agent that is gone"
        claim = Task.objects.filter(pk=task.pk, status=TS.RUNNING, attempts=task.attempts, lease_expires_at__lt=now)
        lost = f"the lease of attempt {task.attempts} on {who} expired (its worker process died)"
        session = task.session
        if session.status not in ACTIVE | {Session.Status.PAUSED}:
            if claim.update(
                status=TS.CANCELLED, finished_at=now, lease_expires_at=None, error=f"{lost}; {session.status}"
            ):
                done["cancelled"] += 1
        elif task.attempts < task.max_attempts:
            if not claim.update(status=TS.QUEUED, queued_at=now, lease_expires_at=None, worker_pid=None, error=lost):
                continue
            leave_canvas(task)
            dispatch_task(task, priority=session.broker_priority)
            session.note(f"task {task.key}: {lost}; re-queued", actor="beat")
            done["requeued"] += 1
        else:
            error = f"gave up after {task.attempts} attempts: {lost}"
            if not claim.update(status=TS.FAILED, finished_at=now, lease_expires_at=None, error=error):
                continue
            reason = f"task {task.key} lost: {lost}, and its {task.max_attempts} attempts are used up"
            if session.transition(Session.Status.ORPHANED, reason=reason, actor="beat", only_from=ACTIVE):
                done["orphaned"] += 1
        logger.warning("task %s of session %s: %s", task.key, session.pk, lost)
    return done
