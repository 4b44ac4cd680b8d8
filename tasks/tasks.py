"""Celery tasks: thin wrappers that take ids and call services."""

import logging

from celery import shared_task

from agents.runtime import current_agent

from . import services
from .canvas import build_canvas

logger = logging.getLogger(__name__)


@shared_task(name="tasks.run_task", bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=False)
def run_task(self, task_id: str) -> str:
    runtime = current_agent()
    if runtime is None:
        # Routed to a worker that is not an agent: put it back for a real agent.
        logger.error("run_task %s reached worker %s, which is not an agent", task_id, self.request.hostname)
        raise self.retry(countdown=5, max_retries=None)
    try:
        outcome = services.execute_task(task_id=task_id, runtime=runtime)
    except services.RetryTask as exc:
        countdown = exc.countdown if exc.countdown is not None else min(10.0, 0.5 * 2**self.request.retries)
        raise self.retry(countdown=countdown, max_retries=None) from exc
    logger.info("task %s on %s: %s", task_id, runtime.name, outcome)
    return outcome


@shared_task(name="tasks.finalize_session", acks_late=True, reject_on_worker_lost=True)
def finalize_session(session_id: str) -> str | None:
    return services.settle_session(session_id)


@shared_task(name="tasks.dispatch_session", acks_late=True, reject_on_worker_lost=True)
def dispatch_session(session_id: str) -> bool:
    """Compile the session's unfinished DAG into a canvas and send it."""
    from sessions.models import ACTIVE, Session

    session = Session.objects.filter(pk=session_id).first()
    if session is None or session.status not in ACTIVE:
        return False
    canvas = build_canvas(session)
    if canvas is None:
        services.settle_session(session_id)
        return False
    canvas.apply_async()
    return True
