"""The Celery tasks: thin wrappers that take ids and call the engine. Each keeps the name it is
registered under (tasks/messages.py) whichever module defines it: messages in the broker,
Beat's schedule rows (orchestrator_project/schedules.py) and Flower know it by that name."""

import logging

from celery import shared_task
from celery.signals import task_prerun
from django.db import InterfaceError, OperationalError, close_old_connections, connections

from agents.runtime import current_agent
from orchestrator_project import logs, metrics
from orchestrator_project.locking import LockUnavailable

from . import fleet, leases, lifecycle, messages, running, sweeps

logger = logging.getLogger(__name__)


@task_prerun.connect
def drop_stale_connections(sender=None, **kwargs) -> None:
    # Connections are reused across tasks (CELERY_DB_REUSE_MAX); like a web request, each task
    # starts by dropping a connection that is too old or saw an error, and checks the one it
    # keeps (SELECT 1). run_task skips that check, which would add a round trip to every short
    # task: a run_task whose connection turns out dead is retried, and the connection is dropped
    # here before the next task.
    close_old_connections()
    if sender is not None and sender.name == messages.RUN_TASK:
        for conn in connections.all(initialized_only=True):
            conn.health_check_done = True


def _backoff(retries: int) -> float:
    return min(10.0, 0.5 * 2**retries)


# max_retries=None on the task: retry(max_retries=None) means "the task's limit" (3 by default),
# and a task may be redirected, wait on an upstream or on the database more often than that.
@shared_task(
    name=messages.RUN_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True, max_retries=None
)
def run_task(self) -> str:
    """Run the task this message names in its id (messages.new_message_id) on this agent."""
    task_id = messages.task_of_message(self.request.id)
    logs.bind(task_id=str(task_id) if task_id else None)
    if task_id is None:
        logger.error("run_task message %s names no task; dropped", self.request.id)
        return "gone"
    runtime = current_agent()
    if runtime is None:
        # Routed to a worker that is not an agent: put it back for a real agent.
        logger.error("run_task %s reached worker %s, which is not an agent", task_id, self.request.hostname)
        raise self.retry(countdown=5)
    logs.bind(agent=runtime.name)
    delivered_to = (self.request.delivery_info or {}).get("routing_key") or ""
    try:
        outcome = running.execute_task(task_id=task_id, runtime=runtime, delivered_to=delivered_to)
    except running.RedirectTask as exc:
        # retry() keeps the message id, so a chord still counts this node; exchange and routing
        # key must be replaced too, or the original delivery info routes it back.
        logger.info("task %s follows its upstream's agent to %s", task_id, exc.queue)
        raise self.retry(countdown=0, queue=exc.queue, exchange=exc.queue, routing_key=exc.queue) from exc
    except running.RetryTask as exc:
        countdown = exc.countdown if exc.countdown is not None else _backoff(self.request.retries)
        raise self.retry(countdown=countdown) from exc
    except (OperationalError, InterfaceError) as exc:
        # The database restarted or the connection broke: try again once it answers. Every
        # hand-off is a compare-and-set, so a step that did commit is not repeated.
        logger.warning("task %s: database unavailable (%s); retrying", task_id, exc)
        raise self.retry(countdown=_backoff(self.request.retries)) from exc
    logger.info("task %s on %s (from %s): %s", task_id, runtime.name, delivered_to, outcome)
    return outcome


@shared_task(
    name=messages.MARK_SESSION_RUNNING,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(LockUnavailable,),
    retry_backoff=0.5,
    max_retries=5,
)
def mark_session_running(session_id: str, key: str, agent_name: str) -> bool:
    # Should the lock stay busy, settle_session still moves a queued session on at the end.
    logs.bind(session_id=session_id, task_key=key, agent=agent_name)
    return lifecycle.mark_session_running(session_id, key, agent_name)


@shared_task(name=messages.FINALIZE_SESSION, acks_late=True, reject_on_worker_lost=True)
def finalize_session(session_id: str) -> str | None:
    logs.bind(session_id=session_id)
    return lifecycle.settle_session(session_id)


@shared_task(name=messages.DISPATCH_SESSION, acks_late=True, reject_on_worker_lost=True)
def dispatch_session(session_id: str) -> bool:
    logs.bind(session_id=session_id)
    return lifecycle.dispatch_session(session_id)


# Beat's periodic tasks (orchestrator_project/schedules.py), on the housekeeping queue. Each
# counts what it repaired, by kind, and when it last succeeded (the stalled-sweep alert).


def _swept(sweep: str, repairs: dict[str, int]) -> dict[str, int]:
    for kind, count in repairs.items():  # zeros too: a repair kind that never happened is a 0, not a gap
        metrics.SWEEP_REPAIRS.labels(sweep, kind).inc(count)
    metrics.SWEEP_LAST_SUCCESS.labels(sweep).set_to_current_time()
    return repairs


@shared_task(name="tasks.reap_expired_leases")
def reap_expired_leases() -> dict[str, int]:
    return _swept("tasks.reap_expired_leases", leases.reap_expired_leases())


@shared_task(name="agents.mark_silent_agents_offline", acks_late=True)
def mark_silent_agents_offline() -> dict[str, int]:
    return _swept("agents.mark_silent_agents_offline", fleet.mark_silent_agents_offline())


@shared_task(name="sessions.sweep_degraded_sessions", acks_late=True)
def sweep_degraded_sessions() -> dict[str, int]:
    return _swept("sessions.sweep_degraded_sessions", sweeps.sweep_degraded_sessions())


@shared_task(name="sessions.sweep_stuck_sessions", acks_late=True)
def sweep_stuck_sessions() -> dict[str, int]:
    return _swept("sessions.sweep_stuck_sessions", sweeps.sweep_stuck_sessions())


@shared_task(name="sessions.apply_retention", acks_late=True)
def apply_retention() -> int:
    deleted, abandoned = sweeps.apply_retention(), sweeps.delete_abandoned_sessions()
    _swept("sessions.apply_retention", {"deleted_sessions": deleted, "deleted_abandoned_sessions": abandoned})
    return deleted + abandoned
