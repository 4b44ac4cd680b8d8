"""Which tasks of a session's DAG may run, and the messages that start them.

A finished task releases what follows it: a dependent with no upstream left open is queued, one
behind a blocking upstream is skipped, and so is what it blocks in turn. A canvas sends its own
nodes' messages; the tasks the database releases (the parts a canvas cannot express, and canvas
nodes whose message was lost) get theirs here. Every hand-off is a compare-and-set on
Task.status, so a duplicate or redelivered message finds the work taken and does nothing.
Cancelling what has not started, and signalling what runs to abort, live here too.
"""

import logging
from typing import NamedTuple

import redis
import structlog
from celery import current_app
from django.db import connection, transaction

from orchestrator_project import metrics
from orchestrator_project.redis_client import redis_client

from . import fairshare, statements
from .messages import RUN_TASK, message, new_message_id, run_task_options
from .models import Task
from .routing import queue_for

logger = logging.getLogger(__name__)
log = structlog.get_logger(__name__)


class RecordedDependents(NamedTuple):
    """What recording a task's outcome did to its pending dependents (statements.RECORD)."""

    lowered: list  # those it took one open upstream from
    ready: list  # of those, the ones with no upstream left open, still pending
    to_send: list  # those it queued itself that are not canvas nodes: they need a message


def blocks_dependents(task: Task) -> bool:
    """Whether a finished task keeps its dependents from running (statements.RELEASE says the
    same in SQL): cancelled or skipped, or required and failed."""
    status = Task.Status
    return task.status in (status.CANCELLED, status.SKIPPED) or (task.required and task.status == status.FAILED)


def release_tasks(ids) -> tuple[dict, list]:
    """Queue the pending tasks among `ids` with no upstream left open; skip those with a
    blocking upstream, and what they block in turn (statements.RELEASE).

    Returns {task id: new status}, and the ids of the queued tasks that the database releases
    rather than a canvas: they need a message (send_released).
    """
    moved: dict = {}
    to_send = []
    while ids:
        rows = statements.run(statements.RELEASE, {"ids": list(ids)})
        ids = [pk for kind, pk, *_ in rows if kind == "opened"]
        for kind, pk, status, via_canvas, capability in rows:
            if kind == "moved":
                moved[pk] = status
                if status == Task.Status.SKIPPED:
                    log.info("task.finished", task_id=str(pk), outcome=status, reason="an upstream blocks it")
                    metrics.TASKS_FINISHED.labels(capability, "none", Task.Status.SKIPPED, "none").inc()
                if status == Task.Status.QUEUED and not via_canvas:
                    to_send.append(pk)
    return moved, to_send


def send_released(ids, *, again: bool = False) -> None:
    """Send the messages of the queued tasks among `ids` (released by the database) that their
    tenant's fair share has room for; the rest are held (tasks.fairshare). Only those with no
    message yet, unless `again`: their message is lost or stranded, and they are sent anew."""
    if not ids:
        return  # the common case: a canvas sends what follows
    queued = Task.objects.filter(pk__in=ids, status=Task.Status.QUEUED, via_canvas=False)
    if again:  # the message they had is gone: it does not count as in flight any more
        queued.update(message_id="", dispatched_to="")
    else:
        queued = queued.filter(message_id="")
    queued = queued.select_related("session__tenant")
    chosen, held = fairshare.admit(list(queued.order_by("-session__priority", "position")), _mark_sending)
    _send(chosen)
    for capability in held:
        transaction.on_commit(lambda capability=capability: release_held(capability))


def release_held(capability: str) -> int:
    """Send the held tasks of the capability that fair share now has room for; returns how many."""
    chosen = fairshare.release_held(capability, _mark_sending)
    _send(chosen)
    return len(chosen)


def _mark_sending(tasks: list[Task]) -> None:
    """Fair share chose these tasks: their message ids, in flight from now on (_send sends them).
    The statement the canvas writes its nodes' ids with; the rest of each row stays as it is."""
    for task in tasks:
        task.message_id = new_message_id(task)
    statements.mark_sending(tasks)


def _send(chosen: list[Task]) -> None:
    """Route and send the tasks fair share chose, after its lock. One that could not be sent (the
    database or the broker failed) is held again with those after it, for the next release;
    inside a caller's transaction, that transaction's rollback does it. A sender that dies
    leaves its tasks to the lost-message sweep."""
    routed: dict[str, int] = {}  # agent name -> tasks sent there in this round (not yet claimed)
    for sent, task in enumerate(chosen):
        try:
            dispatch_task(task, routed)
        except Exception:
            if not connection.in_atomic_block:
                _hold_again(chosen[sent:])
            raise


def _hold_again(unsent: list[Task]) -> None:
    """Chosen tasks whose message did not go out: held again, unless something sent them since."""
    Task.objects.filter(
        pk__in=[t.pk for t in unsent], status=Task.Status.QUEUED, message_id__in=[t.message_id for t in unsent]
    ).update(message_id="", dispatched_to="")


def release_ready_tasks(session_id) -> None:
    """Count every pending task's open upstreams again, then queue those with none open
    (dispatch_session sends them). For start and retry only: no task of the session may
    finish meanwhile, and none blocks another (retry makes every task that did not complete
    or is not still running pending again)."""
    statements.run(statements.RECOUNT, [session_id])
    ready = Task.objects.filter(session_id=session_id, status=Task.Status.PENDING, upstream_open=0)
    release_tasks(list(ready.values_list("pk", flat=True)))


def release_dependents(task: Task, recorded: RecordedDependents | None = None) -> bool:
    """After `task` finished, queue or skip the dependents that can move now (skips pass on
    down), and send the messages of those the database releases rather than a canvas.

    `recorded`: what recording the outcome did to the dependents; None to look at every pending
    dependent (a second release after a crash, or a finish recorded without RECORD). Returns
    whether a dependent is left to run.
    """
    if recorded is None:
        dependents = Task.objects.filter(depends_on=task.pk)
        pending = list(dependents.filter(status=Task.Status.PENDING).values_list("pk", flat=True))
        # Queued here before, but the message may not have gone out; a duplicate is harmless.
        unsent = dependents.filter(status=Task.Status.QUEUED, via_canvas=False).values_list("pk", flat=True)
        recorded = RecordedDependents(pending, pending, list(unsent))
    moved, to_send = release_tasks(recorded.lowered if blocks_dependents(task) else recorded.ready)
    send_released([*recorded.to_send, *to_send])
    return any(moved.get(pk) != Task.Status.SKIPPED for pk in recorded.lowered)


def dispatch_task(task: Task, routed: dict[str, int]) -> None:
    """Send the run_task message of a task fair share chose (it has its message id, so a cancel
    can revoke it) after commit, on the queue routing picks (pin, affinity or capability); not
    if something sent it since it was chosen."""
    options = run_task_options(task, queue=queue_for(task, routed), message_id=task.message_id)
    chosen = Task.objects.filter(pk=task.pk, status=Task.Status.QUEUED, message_id=task.message_id)
    if chosen.update(dispatched_to=options["queue"]):
        transaction.on_commit(lambda: message(RUN_TASK).apply_async(**options))


def resend_queued_task(task: Task, **changes) -> bool:
    """Send a queued task's message again (its first was lost, or waits on the queue of an agent
    that went away), writing `changes` with it; returns whether this call did. A compare-and-set
    on the message id, which sending it again replaces: two sweeps that read the same row send once.

    A canvas node leaves the canvas: it and its descendants are released from the database from
    now on, since the chain that would have sent them waits behind the lost or stranded message.
    Routing skips an agent that went away (not live, or draining), so a stranded task goes to
    cap.<x> or to another upstream agent that can take it.
    """
    with transaction.atomic():
        unchanged = Task.objects.filter(pk=task.pk, status=Task.Status.QUEUED, message_id=task.message_id)
        if not unchanged.update(**changes):
            return False
        for field, value in changes.items():
            setattr(task, field, value)
        leave_canvas(task)
        send_released([task.pk], again=True)
    return True


def leave_canvas(task: Task) -> None:
    """A canvas node whose message is lost or stuck leaves the canvas, with everything after
    it: they are released from the database from now on (their canvas messages, if they still
    come, find the work taken or not ready yet)."""
    if not task.via_canvas:
        return
    stack, released = [task.pk], set()
    while stack:
        pk = stack.pop()
        released.add(pk)
        stack.extend(Task.objects.filter(depends_on=pk).exclude(pk__in=released).values_list("pk", flat=True))
    Task.objects.filter(pk__in=released).update(via_canvas=False)
    # The canvas's ids of those still pending name messages that will not come: when the database
    # releases them, they have none yet (send_released sends only those).
    Task.objects.filter(pk__in=released, status=Task.Status.PENDING).update(message_id="", dispatched_to="")


def abort_key(task_id, attempt: int) -> str:
    # Per attempt: a signal meant for a stopped run must not abort the run after a retry.
    return f"abort:task:{task_id}:{attempt}"


def ask_to_abort(runs: list[tuple], reason: str) -> None:
    """After commit, ask the executors of these runs ((task id, attempt) pairs) to stop: each
    polls its attempt's key (TaskContext.should_abort). Best effort: a run that cannot be told
    is refused when it records (its attempt is stale) or when its lease is reaped."""

    def signal_runs() -> None:
        try:
            for task_id, attempt in runs:
                redis_client().set(abort_key(task_id, attempt), reason[:1000], ex=24 * 3600)
        except redis.RedisError:
            logger.warning("could not ask %d run(s) to abort: Redis is away", len(runs), exc_info=True)

    if runs:
        transaction.on_commit(signal_runs)


def stop_open_tasks(session_id, *, reason: str, revoke: bool, cause: str) -> None:
    """Cancel every task that has not started, and ask running executors to abort. `cause`
    says whose doing it is, for the metrics: user or orchestrator.

    With `revoke`, queued messages are revoked too (cancel/stop: the session will not finish
    its canvas). Fail-fast does not revoke: the cancelled nodes must still flow through the
    canvas quickly so that its chords complete.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE tasks_task SET status = 'cancelled', finished_at = now(), error = %s"
            " WHERE session_id = %s AND status IN ('pending', 'queued') RETURNING capability, message_id",
            [reason[:5000], session_id],
        )
        cancelled = cursor.fetchall()
    message_ids = [message_id for _, message_id in cancelled if message_id] if revoke else []

    def report() -> None:  # once it is so: a transition that rolls back cancelled nothing
        for capability, _ in cancelled:
            metrics.TASKS_FINISHED.labels(capability, "none", Task.Status.CANCELLED, cause).inc()
        # One line for them all, with the count.
        log.info("tasks.cancelled", session_id=str(session_id), count=len(cancelled), reason=reason[:500])

    if cancelled:
        transaction.on_commit(report)
    running = list(Task.objects.filter(session_id=session_id, status=Task.Status.RUNNING).values_list("pk", "attempts"))
    if message_ids:
        transaction.on_commit(lambda: current_app.control.revoke(message_ids))
    ask_to_abort(running, reason)
