"""Celery tasks: thin wrappers that take ids and call services."""

import logging

from celery import shared_task
from celery.signals import task_prerun
from django.db import InterfaceError, OperationalError, close_old_connections, connections

from agents.runtime import current_agent
from sessions.locking import LockUnavailable

from . import services
from .canvas import build_canvas, task_of_message

logger = logging.getLogger(__name__)


@task_prerun.connect
def drop_stale_connections(sender=None, **kwargs) -> None:
    # Connections are reused across tasks (CELERY_DB_REUSE_MAX); like a web request, each task
    # starts by dropping a connection that is too old or saw an error, and checks the one it
    # keeps (SELECT 1). run_task skips that check: it was a third round trip for every short
    # task. A run_task whose connection turns out dead is retried, and the connection is dropped
    # here before the next task.
    close_old_connections()
    if sender is not None and sender.name == "tasks.run_task":
        for conn in connections.all(initialized_only=True):
            conn.health_check_done = True


@shared_task(name="tasks.run_task", bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_task(self) -> str:
    """Run the task this message names in its id (canvas.new_message_id) on this agent."""
    task_id = task_of_message(self.request.id)
    if task_id is None:
        logger.error("run_task message %s names no task; dropped", self.request.id)
        return "gone"
    runtime = current_agent()
    if runtime is None:
        # Routed to a worker that is not an agent: put it back for a real agent.
        logger.error("run_task %s reached worker %s, which is not an agent", task_id, self.request.hostname)
        raise self.retry(countdown=5, max_retries=None)
    delivered_to = (self.request.delivery_info or {}).get("routing_key") or ""
    try:
        outcome = services.execute_task(task_id=task_id, runtime=runtime, delivered_to=delivered_to)
    except services.RedirectTask as exc:
        # retry() keeps the message id, so a chord still counts this node; exchange and routing
        # key must be replaced too, or the original delivery info routes it back.
        logger.info("task %s follows its upstream's agent to %s", task_id, exc.queue)
        raise self.retry(
            countdown=0, max_retries=None, queue=exc.queue, exchange=exc.queue, routing_key=exc.queue
        ) from exc
    except services.RetryTask as exc:
        countdown = exc.countdown if exc.countdown is not None else min(10.0, 0.5 * 2**self.request.retries)
        raise self.retry(countdown=countdown, max_retries=None) from exc
    except (OperationalError, InterfaceError) as exc:
        # The database restarted or the connection broke: try again once it answers. Every
        # hand-off is a compare-and-set, so a step that did commit is not repeated.
        logger.warning("task %s: database unavailable (%s); retrying", task_id, exc)
        raise self.retry(countdown=min(10.0, 0.5 * 2**self.request.retries), max_retries=None) from exc
    logger.info("task %s on %s (from %s): %s", task_id, runtime.name, delivered_to, outcome)
    return outcome


@shared_task(
    name="tasks.mark_session_running",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(LockUnavailable,),
    retry_backoff=0.5,
    max_retries=5,
)
def mark_session_running(session_id: str, key: str, agent_name: str) -> bool:
    # Should the lock stay busy, settle_session still moves a queued session on at the end.
    return services.mark_session_running(session_id, key, agent_name)


@shared_task(name="tasks.reap_expired_leases")
def reap_expired_leases() -> dict[str, int]:
    from .leases import reap_expired_leases

    return reap_expired_leases()


@shared_task(name="tasks.finalize_session", acks_late=True, reject_on_worker_lost=True)
def finalize_session(session_id: str) -> str | None:
    return services.settle_session(session_id)


@shared_task(name="tasks.dispatch_session", acks_late=True, reject_on_worker_lost=True)
def dispatch_session(session_id: str) -> bool:
    """Send the session's unfinished DAG: a canvas for its series-parallel part, single messages
    for the tasks the database releases that are ready now."""
    from sessions.models import ACTIVE, Session

    session = Session.objects.filter(pk=session_id).first()
    if session is None or session.status not in ACTIVE:
        return False
    if session.repository and not services.prepare_workspace_or_fail(session):
        return False
    canvas, released = build_canvas(session)
    if canvas is None and not released:
        services.settle_session(session_id)
        return False
    if canvas is not None:
        canvas.apply_async()
    # Read now, not when compiled: an upstream that finished while the canvas was built may
    # have queued a task before it was marked as released (and so sent nothing). A duplicate
    # message is harmless.
    services.send_released([t.pk for t in released], session.broker_priority)
    return True
