"""Running one task on an agent, and settling what its outcome means for the rest of the DAG.

The database is the source of truth; a run_task message is a hint that a task may be ready.
Every hand-off is a compare-and-set on Task.status, so a duplicate or redelivered message
finds the work already taken and returns without doing anything.
"""

import logging
import time
from datetime import timedelta

from celery import current_app
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction
from django.db.models import Count, F, Q
from django.utils import timezone

from agents.executors import TaskAborted, TaskContext, TaskFailed, TransientError
from agents.models import Agent
from agents.routing import affinity_agent, queue_for
from agents.runtime import AgentRuntime
from sessions.locking import LockUnavailable, redis_client
from sessions.models import ACTIVE, Checkpoint, Session

from .canvas import message_options
from .models import Task

logger = logging.getLogger(__name__)
TS = Task.Status
UNFINISHED = (TS.PENDING, TS.QUEUED, TS.RUNNING)


class RetryTask(Exception):
    """Ask Celery to deliver the same message again after `countdown` seconds (None: back off)."""

    def __init__(self, countdown: float | None, reason: str):
        super().__init__(reason)
        self.countdown = countdown


def _blocking(prefix: str = "") -> Q:
    """An upstream blocks its dependents if it was cancelled or skipped (a skip passes on down
    the DAG, through optional tasks too), or is required and failed. `prefix` reaches the
    upstream through a relation, e.g. "depends_on__"."""
    return Q(**{f"{prefix}status__in": (TS.CANCELLED, TS.SKIPPED)}) | Q(
        **{f"{prefix}required": True, f"{prefix}status": TS.FAILED}
    )


def _satisfying(prefix: str = "") -> Q:
    """An upstream lets its dependents run if it completed, or is optional and failed."""
    return Q(**{f"{prefix}status": TS.COMPLETED}) | Q(**{f"{prefix}required": False, f"{prefix}status": TS.FAILED})


def _with_upstream_counts(tasks):
    """Annotate each task with how many upstreams block it and how many it still waits for.

    Counting in SQL keeps a fan-in of hundreds of upstreams from loading them all, once per
    upstream that finishes.
    """
    return tasks.annotate(
        n_blocking=Count("depends_on", filter=_blocking("depends_on__")),
        n_waiting=Count("depends_on") - Count("depends_on", filter=_satisfying("depends_on__")),
    )


def _promote(task: Task) -> str | None:
    """Move an annotated pending task to queued or skipped; returns the status it moved to."""
    now = timezone.now()
    if task.n_blocking:
        culprit = Task.objects.filter(_blocking(), dependents=task).values_list("key", "status").first()
        reason = f"skipped: upstream {culprit[0]} {culprit[1]}" if culprit else "skipped: upstream did not complete"
        moved = Task.objects.filter(pk=task.pk, status=TS.PENDING).update(
            status=TS.SKIPPED, finished_at=now, error=reason
        )
        return TS.SKIPPED if moved else None
    if task.n_waiting == 0:
        moved = Task.objects.filter(pk=task.pk, status=TS.PENDING).update(status=TS.QUEUED, queued_at=now)
        return TS.QUEUED if moved else None
    return None


def release_ready_tasks(session_id) -> None:
    """Queue every pending task of the session whose upstreams allow it; skip the blocked ones.

    A skip can block further tasks, so loop until nothing changes (at most depth + 1 passes).
    """
    changed = True
    while changed:
        pending = _with_upstream_counts(Task.objects.filter(session_id=session_id, status=TS.PENDING))
        changed = any([_promote(task) is not None for task in pending])


def settle_dependents(task: Task, priority: int) -> bool:
    """After `task` finished, queue or skip its dependents (skips transitively), and send the
    messages of newly queued tasks that the database releases rather than a canvas.

    Returns whether a dependent is left to run (so the session cannot be finished yet).
    """
    left_to_run = False
    routed: dict[str, int] = {}  # agent name -> tasks this call sent there (not yet claimed)
    stack = [task]
    while stack:
        finished = stack.pop()
        # Select the dependents by id: filtering through `dependents` here would reuse the join
        # the counts need, and count only the upstream that just finished.
        dependents = Task.objects.filter(pk__in=finished.dependents.values("pk"), status=TS.PENDING)
        for down in _with_upstream_counts(dependents):
            promoted = _promote(down)
            if promoted == TS.SKIPPED:
                stack.append(down)
                continue
            left_to_run = True
            if promoted == TS.QUEUED and not down.via_canvas:
                dispatch_task(down, priority=priority, routed=routed)
    return left_to_run


def dispatch_task(task: Task, *, priority: int, routed: dict[str, int] | None = None) -> None:
    """Send one run_task message after commit, on the queue routing picks (pin, affinity or
    capability), and remember its id so a cancel can revoke it."""
    from .tasks import run_task

    queue = queue_for(task, routed)
    options = message_options(task, queue=queue, priority=priority)
    Task.objects.filter(pk=task.pk).update(message_id=options["task_id"], dispatched_to=queue)
    transaction.on_commit(lambda: run_task.apply_async((str(task.pk),), **options))


class RedirectTask(Exception):
    """Deliver this message to another queue instead (workspace affinity)."""

    def __init__(self, queue: str):
        super().__init__(queue)
        self.queue = queue


def execute_task(*, task_id, runtime: AgentRuntime, delivered_to: str = "") -> str:
    """Claim, run and record one task on this agent; returns what happened, for the log."""
    task = Task.objects.select_related("session").filter(pk=task_id).first()
    if task is None:
        return "gone"
    session = task.session
    if session.status not in ACTIVE:
        return f"session {session.status}"
    if task.status == TS.PENDING:
        verdict = _promote(_with_upstream_counts(Task.objects.filter(pk=task.pk)).get())
        if verdict == TS.SKIPPED:
            _settle_after(task, session)
            return "skipped"
        if verdict is None:
            # An upstream is still running (e.g. after a resume); poll instead of waiting on it.
            raise RetryTask(countdown=None, reason="upstream still running")
    if task.status in Task.FINISHED:
        # A worker may have died between recording this task and releasing what follows;
        # settling again is idempotent, so a redelivered message finishes the job.
        _settle_after(task, session)
        return "taken"
    if task.status == TS.RUNNING:
        return "taken"
    _follow_affinity(task, runtime, delivered_to)
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


def _follow_affinity(task: Task, runtime: AgentRuntime, delivered_to: str) -> None:
    """A canvas node arrives on its capability queue; if an upstream's agent (warm workspace)
    can take it now, hand the message over. Messages on agent.<name> queues are never moved."""
    if task.pinned_agent or not delivered_to.startswith("cap."):
        return
    preferred = affinity_agent(task)
    if preferred is not None and preferred.name != runtime.name:
        queue = f"agent.{preferred.name}"
        Task.objects.filter(pk=task.pk).update(dispatched_to=queue)
        raise RedirectTask(queue)


def claim_task(task: Task, runtime: AgentRuntime) -> int | None:
    """queued -> running for this agent, only if nobody else claimed it.

    The filter must stay on the task row's own columns: a filter across a relation makes Django
    write `WHERE id IN (subquery)`, and PostgreSQL's re-check after waiting on the row lock does
    not re-run the subquery, so two racing claims would both win.
    """
    now = timezone.now()
    with transaction.atomic():
        # Matching the attempt count we read makes the new count known without reading it back.
        claimed = Task.objects.filter(pk=task.pk, status=TS.QUEUED, attempts=task.attempts).update(
            status=TS.RUNNING,
            attempts=task.attempts + 1,
            agent_id=runtime.agent_id,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=task_timeout(task)),
            error="",
        )
        if claimed:
            Agent.objects.filter(pk=runtime.agent_id).update(current_load=F("current_load") + 1)
    if not claimed:
        return None
    task.attempts, task.status, task.agent_id = task.attempts + 1, TS.RUNNING, runtime.agent_id
    return task.attempts


def task_timeout(task: Task) -> int:
    return task.timeout_seconds or settings.TASK_DEADLINE_SECONDS


def abort_key(task_id, attempt: int) -> str:
    # Per attempt: a signal meant for a stopped run must not abort the run after a retry.
    return f"abort:task:{task_id}:{attempt}"


def _context(task: Task, attempt: int) -> TaskContext:
    key = abort_key(task.pk, attempt)
    return TaskContext(
        task_id=str(task.pk),
        session_id=str(task.session_id),
        key=task.key,
        title=task.title,
        capability=task.capability,
        instructions=task.instructions,
        params=task.params,
        workspace=settings.WORKSPACE_ROOT / str(task.session_id),
        attempt=attempt,
        timeout_s=float(task_timeout(task)),
        should_abort=lambda: bool(redis_client().exists(key)),
    )


def _run_claimed(task: Task, attempt: int, runtime: AgentRuntime) -> str:
    started = time.monotonic()
    ctx = _context(task, attempt)
    outcome, result, error = TS.FAILED, {}, ""
    try:
        result = runtime.executor.execute(ctx)
        outcome = TS.COMPLETED
    except TransientError as exc:
        return _retry_or_fail(task, attempt, str(exc), runtime, time.monotonic() - started)
    except TaskFailed as exc:
        result, error = exc.result, str(exc)
    except TaskAborted as exc:
        outcome, error = TS.CANCELLED, f"aborted: {exc}"
    except SoftTimeLimitExceeded:
        error = f"deadline of {ctx.timeout_s:g}s exceeded"
    except Exception as exc:
        # An executor bug must not kill the canvas: record it as the task's failure.
        logger.exception("executor %s crashed on task %s", runtime.executor_kind, task.pk)
        error = f"executor error: {exc!r}"
    finished = (runtime.agent_id, time.monotonic() - started)
    record_outcome(task, attempt, outcome, result=result, error=error, finished_on=finished)
    return outcome


def _retry_or_fail(task: Task, attempt: int, error: str, runtime: AgentRuntime, duration_s: float) -> str:
    finished = (runtime.agent_id, duration_s)
    if attempt >= task.max_attempts:
        error = f"gave up after {attempt} attempts: {error}"
        record_outcome(task, attempt, TS.FAILED, error=error, finished_on=finished)
        return "failed"
    with transaction.atomic():
        Agent(pk=runtime.agent_id).task_finished(succeeded=False, duration_s=duration_s)
        requeued = Task.objects.filter(pk=task.pk, status=TS.RUNNING, attempts=attempt).update(
            status=TS.QUEUED, error=f"attempt {attempt} failed: {error}", lease_expires_at=None
        )
    if not requeued:
        return "taken"
    raise RetryTask(countdown=min(60.0, 2.0**attempt), reason=error)


def record_outcome(
    task: Task,
    attempt: int,
    status: str,
    *,
    result: dict | None = None,
    error: str = "",
    finished_on: tuple[int, float] | None = None,
) -> None:
    """running -> completed|failed|cancelled for this attempt, then settle what follows from it.

    `finished_on` is (agent id, seconds): the agent's load and counters change in the same
    transaction as the task. A stale attempt (the task was taken over) changes nothing else.
    Dependents are settled after the commit: two upstreams finishing at once must each see the
    other's committed status, or their shared dependent would be left pending.
    """
    with transaction.atomic():
        if finished_on is not None:
            Agent(pk=finished_on[0]).task_finished(succeeded=status == TS.COMPLETED, duration_s=finished_on[1])
        recorded = Task.objects.filter(pk=task.pk, status=TS.RUNNING, attempts=attempt).update(
            status=status, result=result or {}, error=error[:5000], finished_at=timezone.now(), lease_expires_at=None
        )
        if recorded and status == TS.COMPLETED:
            done = Task.objects.filter(session_id=task.session_id, status=TS.COMPLETED).order_by("key")
            keys = list(done.values_list("key", flat=True))
            Checkpoint.objects.create(session_id=task.session_id, task_id=task.pk, completed_task_keys=keys)
    if not recorded:
        return
    session = task.session  # loaded with the task; priority and fail_fast do not change
    if status == TS.FAILED and task.required and session.fail_fast:
        stop_open_tasks(session.pk, reason=f"fail-fast: required task {task.key} failed", revoke=False)
    _settle_after(task, session)


def _settle_after(task: Task, session: Session) -> None:
    """Release or skip what follows a finished task, and finalize the session after its last task.

    Runs after the outcome is committed. If it fails (database or broker trouble), the message
    is delivered again: execute_task then finds the task finished and settles again.
    """
    try:
        left_to_run = settle_dependents(task, session.broker_priority)
        if not left_to_run and not Task.objects.filter(session_id=task.session_id, status__in=UNFINISHED).exists():
            # The last task settles the session; the canvas's finalize_session may find it done.
            from .tasks import finalize_session

            finalize_session.apply_async((str(task.session_id),), priority=session.broker_priority)
    except Exception as exc:
        logger.warning("settling after task %s failed; will retry", task.pk, exc_info=True)
        raise RetryTask(countdown=2.0, reason=f"settling after {task.key} failed: {exc!r}") from exc


def reroute_stranded_task(task: Task) -> None:
    """Send again a task whose message waits on the queue of an agent that went away.

    Only for tasks sent there by affinity (pinned tasks wait for their agent by design). A canvas
    node leaves the canvas: it and its descendants are released from the database from now on,
    since the chain that would have sent them waits behind the stranded message.
    """
    if task.via_canvas:
        stack, released = [task.pk], set()
        while stack:
            pk = stack.pop()
            released.add(pk)
            stack.extend(Task.objects.filter(depends_on=pk).exclude(pk__in=released).values_list("pk", flat=True))
        Task.objects.filter(pk__in=released).update(via_canvas=False)
    task.dispatched_to = ""
    Task.objects.filter(pk=task.pk).update(dispatched_to="")
    # Routing skips the agent that went away (not live, or draining), so this goes to cap.<x>
    # or to another upstream agent that can take it.
    dispatch_task(task, priority=task.session.broker_priority)


def stop_open_tasks(session_id, *, reason: str, revoke: bool) -> None:
    """Cancel every task that has not started, and ask running executors to abort.

    With `revoke`, queued messages are revoked too (cancel/stop: the session will not finish
    its canvas). Fail-fast does not revoke: the cancelled nodes must still flow through the
    canvas quickly so that its chords complete.
    """
    open_tasks = Task.objects.filter(session_id=session_id, status__in=(TS.PENDING, TS.QUEUED))
    message_ids = [m for m in open_tasks.values_list("message_id", flat=True) if m] if revoke else []
    open_tasks.update(status=TS.CANCELLED, finished_at=timezone.now(), error=reason[:5000])
    running = list(Task.objects.filter(session_id=session_id, status=TS.RUNNING).values_list("pk", "attempts"))

    def signal_workers() -> None:
        if message_ids:
            current_app.control.revoke(message_ids)
        for task_id, attempt in running:
            redis_client().set(abort_key(task_id, attempt), reason, ex=24 * 3600)

    transaction.on_commit(signal_workers)


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
