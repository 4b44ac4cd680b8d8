"""Running one task on an agent, and settling what its outcome means for the rest of the DAG.

The database is the source of truth; a run_task message is a hint that a task may be ready.
Every hand-off is a compare-and-set on Task.status, so a duplicate or redelivered message
finds the work already taken and returns without doing anything.
"""

import json
import logging
import os

import redis
from celery import current_app
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from agents.executors import TaskAborted, TaskContext, TaskFailed, TransientError
from agents.routing import affinity_agent, queue_for
from agents.runtime import AgentRuntime
from sessions.locking import LockUnavailable, redis_client
from sessions.models import ACTIVE, Session, broker_priority
from sessions.workspaces import WorkspaceError, finish_workspace, prepare_workspace, workspace_of

from . import statements
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


def _blocks(task: Task) -> bool:
    """Whether a finished task keeps its dependents from running (statements.RELEASE says the
    same in SQL): cancelled or skipped, or required and failed."""
    return task.status in (TS.CANCELLED, TS.SKIPPED) or (task.required and task.status == TS.FAILED)


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
        ids = [pk for kind, pk, _, _ in rows if kind == "opened"]
        for kind, pk, status, via_canvas in rows:
            if kind == "moved":
                moved[pk] = status
                if status == TS.QUEUED and not via_canvas:
                    to_send.append(pk)
    return moved, to_send


def send_released(ids, priority: int) -> None:
    """Send the messages of the queued tasks among `ids` (released by the database)."""
    if not ids:
        return  # the common case: a canvas sends what follows
    routed: dict[str, int] = {}  # agent name -> tasks sent there in this round (not yet claimed)
    for task in Task.objects.filter(pk__in=ids, status=TS.QUEUED):
        dispatch_task(task, priority=priority, routed=routed)


def release_ready_tasks(session_id) -> None:
    """Count every pending task's open upstreams again, then queue those with none open
    (dispatch_session sends them). For start and retry only: no task of the session may
    finish meanwhile, and none blocks another (retry makes every task that did not complete
    or is not still running pending again)."""
    statements.run(statements.RECOUNT, [session_id])
    ready = Task.objects.filter(session_id=session_id, status=TS.PENDING, upstream_open=0)
    release_tasks(list(ready.values_list("pk", flat=True)))


def settle_dependents(task: Task, priority: int, recorded: tuple | None = None) -> bool:
    """After `task` finished, queue or skip the dependents that can move now (skips pass on
    down), and send the messages of those the database releases rather than a canvas.

    `recorded` is what statements.RECORD returned about the dependents: (those it lowered,
    those of them with no upstream left open, those it queued that need a message). None for a
    second settle after a crash, which looks at every pending dependent. Returns whether a
    dependent is left to run.
    """
    if recorded is None:
        dependents = Task.objects.filter(depends_on=task.pk)
        pending = list(dependents.filter(status=TS.PENDING).values_list("pk", flat=True))
        # Queued here before, but the message may not have gone out; a duplicate is harmless.
        unsent = dependents.filter(status=TS.QUEUED, via_canvas=False).values_list("pk", flat=True)
        recorded = (pending, pending, list(unsent))
    opened, ready, queued = recorded
    moved, to_send = release_tasks(opened if _blocks(task) else ready)
    send_released([*queued, *to_send], priority)
    return any(moved.get(pk) != TS.SKIPPED for pk in opened)


def dispatch_task(task: Task, *, priority: int, routed: dict[str, int] | None = None) -> None:
    """Send one run_task message after commit, on the queue routing picks (pin, affinity or
    capability), and remember its id so a cancel can revoke it."""
    from .tasks import run_task

    queue = queue_for(task, routed)
    options = message_options(task, queue=queue, priority=priority)
    Task.objects.filter(pk=task.pk).update(message_id=options["task_id"], dispatched_to=queue)
    transaction.on_commit(lambda: run_task.apply_async(**options))


class RedirectTask(Exception):
    """Deliver this message to another queue instead (workspace affinity)."""

    def __init__(self, queue: str):
        super().__init__(queue)
        self.queue = queue


# from_db takes the values in the model's field order; TAKE returns them in LOAD_FIELDS order.
_MODEL_ORDER = [
    statements.LOAD_FIELDS.index(field.attname)
    for field in Task._meta.concrete_fields
    if field.attname in statements.LOAD_FIELDS
]


def take_task(task_id, runtime: AgentRuntime, *, stays: bool) -> tuple[Task | None, int | None]:
    """Load the task and, when nothing needs a closer look, claim it for this agent in the same
    statement (statements.TAKE); returns the task and the attempt claimed, or None.

    The task carries the columns of statements.LOAD_FIELDS and session_status,
    session_fail_fast, session_priority, session_version and upstream_agents (ids of the
    agents that ran its upstreams). `stays`: the message came on a queue routing never moves it from.
    """
    params = {
        "task": task_id,
        "agent": runtime.agent_id,
        "stays": stays,
        "lease": settings.TASK_LEASE_SECONDS,
        "pid": os.getpid(),
    }
    rows = statements.run(statements.TAKE, params)
    if not rows:
        return None, None
    *values, session_status, session_fail_fast, session_priority, session_version, upstream_agents, attempt = rows[0]
    task = Task.from_db(connection.alias, statements.LOAD_FIELDS, [values[i] for i in _MODEL_ORDER])
    task.params = json.loads(task.params)  # jsonb arrives as text, as Django's JSONField expects
    task.session_status, task.session_fail_fast = session_status, session_fail_fast
    task.session_priority, task.session_version = session_priority, session_version
    task.upstream_agents = upstream_agents
    if attempt is not None:
        task.attempts, task.status, task.agent_id = attempt, TS.RUNNING, runtime.agent_id
    return task, attempt


def execute_task(*, task_id, runtime: AgentRuntime, delivered_to: str = "") -> str:
    """Claim, run and record one task on this agent; returns what happened, for the log."""
    task, attempt = take_task(task_id, runtime, stays=not delivered_to.startswith("cap."))
    if task is None:
        return "gone"
    if attempt is None:
        # Not claimed at once: see why, and claim it if it can still be.
        if task.session_status not in ACTIVE:
            return f"session {task.session_status}"
        if task.status == TS.PENDING:
            verdict, _ = release_tasks([task.pk])
            if verdict.get(task.pk) == TS.SKIPPED:
                task.status = TS.SKIPPED
                _settle_after(task)
                return "skipped"
            if task.pk not in verdict:
                # An upstream is still running (e.g. after a resume); poll instead of waiting on it.
                raise RetryTask(countdown=None, reason="upstream still running")
            task.status = TS.QUEUED
        if task.status in Task.FINISHED:
            # A worker may have died between recording this task and releasing what follows;
            # settling again is idempotent, so a redelivered message finishes the job.
            _settle_after(task)
            return "taken"
        if task.status == TS.RUNNING:
            attempt = _own_lost_claim(task, runtime)
            if attempt is None:
                return "taken"
            return _run_claimed(task, attempt, runtime)
        _follow_affinity(task, runtime, delivered_to)
        attempt = claim_task(task, runtime)
        if attempt is None:
            return "taken"
    try:
        if task.session_status == Session.Status.QUEUED:
            _note_first_claim(task, runtime)
        return _run_claimed(task, attempt, runtime)
    except Exception:
        _let_go(task, attempt)
        raise


def _let_go(task: Task, attempt: int) -> None:
    """An error escaped after this process claimed the task: end the claim's lease now, so that
    Beat's reaper takes the task back (attempt + 1, with a note) instead of the lease being
    renewed for as long as this process lives. A task already recorded or re-queued is left."""
    try:
        mine = Task.objects.filter(pk=task.pk, status=TS.RUNNING, attempts=attempt, worker_pid=os.getpid())
        mine.update(lease_expires_at=timezone.now(), worker_pid=None)
    except Exception:
        logger.warning("task %s: could not end the lease of attempt %s", task.pk, attempt, exc_info=True)


def _own_lost_claim(task: Task, runtime: AgentRuntime) -> int | None:
    """The attempt of a claim this very process made but is not running: the claim's reply was
    lost (statements.run ran TAKE again), or recording the outcome failed and the message came
    back. A pool process runs one task at a time, so nobody runs it; and since this process
    lives, its lease would be renewed forever. It runs again under the same attempt."""
    mine = Task.objects.filter(pk=task.pk, status=TS.RUNNING, agent_id=runtime.agent_id, worker_pid=os.getpid())
    attempt = mine.values_list("attempts", flat=True).first()
    if attempt is not None:
        logger.warning("task %s: this process claimed attempt %s and lost track of it; running it", task.pk, attempt)
    return attempt


# (session id, version) of the queued sessions this process has sent mark_session_running for.
_noted_claims: set[tuple] = set()


def _note_first_claim(task: Task, runtime: AgentRuntime) -> None:
    """The first claim moves a queued session to running. The orchestrator does that (a lock
    and three writes) while this task runs, rather than this task before it runs. Sent once per
    process and queued spell (the version changes with every transition); more claims may land
    before it is done, and another process may send it too: a message that finds the session
    running already changes nothing."""
    from .tasks import mark_session_running

    noted = (task.session_id, task.session_version)
    if noted in _noted_claims:
        return
    if len(_noted_claims) >= 1000:
        _noted_claims.clear()
    _noted_claims.add(noted)
    args = (str(task.session_id), task.key, runtime.name)
    try:
        mark_session_running.apply_async(args, priority=broker_priority(task.session_priority))
    except Exception:  # the broker is away: the stuck-session sweep, or settling, marks it running
        logger.warning("could not ask to mark session %s running", task.session_id, exc_info=True)


def mark_session_running(session_id, key: str, agent_name: str) -> bool:
    """queued -> running: the session's first task (`key`) was claimed by `agent_name`.
    Nothing happens if the session has moved on meanwhile (a later claim, a pause, settling)."""
    session = Session.objects.filter(pk=session_id).first()
    if session is None or session.status != Session.Status.QUEUED:
        return False
    event = session.transition(
        Session.Status.RUNNING,
        reason=f"task {key} claimed by {agent_name}",
        actor=f"agent:{agent_name}",
        only_from=frozenset({Session.Status.QUEUED}),
    )
    return event is not None


def _follow_affinity(task: Task, runtime: AgentRuntime, delivered_to: str) -> None:
    """A canvas node arrives on its capability queue; unless this agent ran one of its upstreams,
    hand the message to an upstream's agent (warm workspace) that can take it now. Messages on
    agent.<name> queues are never moved."""
    if task.pinned_agent or not delivered_to.startswith("cap."):
        return
    if not task.upstream_agents or runtime.agent_id in task.upstream_agents:
        return
    preferred = affinity_agent(task, among=task.upstream_agents)
    if preferred is not None and preferred.name != runtime.name:
        queue = f"agent.{preferred.name}"
        Task.objects.filter(pk=task.pk).update(dispatched_to=queue)
        raise RedirectTask(queue)


def claim_task(task: Task, runtime: AgentRuntime) -> int | None:
    """queued -> running for this agent unless another delivery got there first; returns the
    attempt. It is TAKE with routing already decided (`stays`)."""
    _, attempt = take_task(task.pk, runtime, stays=True)
    if attempt is not None:
        task.attempts, task.status, task.agent_id = attempt, TS.RUNNING, runtime.agent_id
    return attempt


def task_timeout(task: Task) -> int:
    return task.timeout_seconds or settings.TASK_DEADLINE_SECONDS


def abort_key(task_id, attempt: int) -> str:
    # Per attempt: a signal meant for a stopped run must not abort the run after a retry.
    return f"abort:task:{task_id}:{attempt}"


def task_context(task: Task, attempt: int) -> TaskContext:
    key = abort_key(task.pk, attempt)
    return TaskContext(
        task_id=str(task.pk),
        session_id=str(task.session_id),
        key=task.key,
        title=task.title,
        capability=task.capability,
        instructions=task.instructions,
        params=task.params,
        workspace=workspace_of(task.session_id),
        attempt=attempt,
        timeout_s=float(task_timeout(task)),
        should_abort=lambda: _abort_requested(key),
    )


def _abort_requested(key: str) -> bool:
    try:
        return bool(redis_client().exists(key))
    except redis.RedisError:
        logger.warning("cannot reach Redis to check %s; the task goes on", key)
        return False  # Redis restarting must not stop the work; a later check sees a cancel


def _run_claimed(task: Task, attempt: int, runtime: AgentRuntime) -> str:
    ctx = task_context(task, attempt)
    outcome, result, error = TS.FAILED, {}, ""
    try:
        result = runtime.executor.execute(ctx)
        outcome = TS.COMPLETED
    except (TransientError, redis.ConnectionError, redis.TimeoutError) as exc:
        return _retry_or_fail(task, attempt, str(exc))
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
    record_outcome(task, attempt, outcome, result=result, error=error)
    return outcome


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
    """running -> completed|failed|cancelled for this attempt, then settle what follows from it.

    `task` comes from take_task. The outcome, its checkpoint and the dependents' bookkeeping are
    one statement (statements.RECORD); a stale attempt (the task was taken over) changes
    nothing. Dependents that wait for other upstreams too are released after that commit: two
    upstreams finishing at once must each see the other's committed status.
    """
    params = {
        "task": task.pk,
        "attempt": attempt,
        "status": status,
        "result": json.dumps(result or {}, cls=DjangoJSONEncoder),
        "error": error[:5000],
    }
    [(recorded, *dependents)] = _record(params)
    if not recorded:
        # A stale attempt - or this one, if the statement committed and its reply was lost
        # (statements.run tried again): then settle from the rows, like a redelivery does.
        if Task.objects.filter(pk=task.pk, status=status, attempts=attempt).exists():
            task.status = status
            _settle_after(task)
        return
    task.status = status
    if status == TS.FAILED and task.required and task.session_fail_fast:
        stop_open_tasks(task.session_id, reason=f"fail-fast: required task {task.key} failed", revoke=False)
        dependents = None  # they were just cancelled: settle from the rows
    _settle_after(task, dependents)


def _record(params: dict) -> list[tuple]:
    """statements.RECORD; should the database stay away past statements.run's own retries (a
    PostgreSQL restart), keep trying in this process: the outcome must land while this process
    holds the claim. A message retried instead could reach another process, which finds the task
    running on a live process and leaves it. The heartbeat keeps the lease meanwhile; past the
    lease the reaper takes the task back, and this attempt's outcome is stale anyway."""
    try:
        return statements.run(statements.RECORD, params)
    except (OperationalError, InterfaceError):
        return _record_until_it_lands(params)


# Only after a failure, as in statements.run: tenacity's bookkeeping costs more than the hot path can spare.
@retry(
    retry=retry_if_exception_type((OperationalError, InterfaceError)),
    stop=stop_after_delay(settings.TASK_LEASE_SECONDS),
    wait=wait_exponential(multiplier=0.2, max=5.0),
    before_sleep=lambda state: connection.close(),
    reraise=True,
)
def _record_until_it_lands(params: dict) -> list[tuple]:
    return statements.run(statements.RECORD, params)


def _settle_after(task: Task, recorded: tuple | None = None) -> None:
    """Release or skip what follows a finished task, and finalize the session after its last task.

    Runs after the outcome is committed. If it fails (database or broker trouble), the message
    is delivered again: execute_task then finds the task finished and settles again.
    """
    priority = broker_priority(task.session_priority)
    try:
        left_to_run = settle_dependents(task, priority, recorded)
        if not left_to_run and not Task.objects.filter(session_id=task.session_id, status__in=UNFINISHED).exists():
            # The last task settles the session; the canvas's finalize_session may find it done.
            from .tasks import finalize_session

            finalize_session.apply_async((str(task.session_id),), priority=priority)
    except Exception as exc:
        logger.warning("settling after task %s failed; will retry", task.pk, exc_info=True)
        raise RetryTask(countdown=2.0, reason=f"settling after {task.key} failed: {exc!r}") from exc


def resend_queued_task(task: Task, **changes) -> bool:
    """Send a queued task's message again (its first was lost, or waits on the queue of an agent
    that went away), writing `changes` with it; returns whether this call did. A compare-and-set
    on the message id, which dispatch_task replaces: two sweeps that read the same row send once.

    A canvas node leaves the canvas: it and its descendants are released from the database from
    now on, since the chain that would have sent them waits behind the lost or stranded message.
    Routing skips an agent that went away (not live, or draining), so a stranded task goes to
    cap.<x> or to another upstream agent that can take it.
    """
    with transaction.atomic():
        mine = Task.objects.filter(pk=task.pk, status=TS.QUEUED, message_id=task.message_id)
        if not mine.update(**changes):
            return False
        for field, value in changes.items():
            setattr(task, field, value)
        leave_canvas(task)
        dispatch_task(task, priority=task.session.broker_priority)
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
    summary = {"task_counts": counts}
    if session.repository:  # git runs here, before the lock: slow I/O stays out of the transition
        try:
            summary["workspace"] = finish_workspace(session)
        except WorkspaceError as exc:
            logger.warning("session %s: could not record its workspace: %s", session.pk, exc)
            summary["workspace"] = {"error": str(exc), "branch": session.workspace_branch}
        except LockUnavailable as exc:  # another session's git write holds the repository
            logger.warning("session %s: settling later, its repository is busy: %s", session.pk, exc)
            return None

    def store_summary(row: Session) -> None:
        row.result = {**row.result, **summary}
        row.save(update_fields=["result"])

    event = session.transition(outcome, reason=reason, only_from=ACTIVE, effects=store_summary)
    return outcome if event else None


def prepare_workspace_or_fail(session: Session) -> bool:
    """Make the session's workspace (sessions.workspaces) before any of its tasks is sent; a
    repository that cannot be used fails the session with git's reason."""
    try:
        prepare_workspace(session)
        return True
    except WorkspaceError as exc:
        reason = f"could not prepare the workspace: {exc}"[:500]
    except LockUnavailable as exc:
        reason = f"could not own the workspace: {exc}"[:500]

    def stop_tasks(row: Session) -> None:
        stop_open_tasks(row.pk, reason=reason, revoke=True)

    logger.warning("session %s: %s", session.pk, reason)
    session.transition(Session.Status.FAILED, reason=reason, actor="orchestrator", only_from=ACTIVE, effects=stop_tasks)
    return False


def task_counts(tasks) -> dict[str, int]:
    counts = dict.fromkeys(TS.values, 0)
    for task in tasks:
        counts[task.status] += 1
    return counts
