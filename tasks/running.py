"""Running one task on an agent: claim it, run its executor, record the outcome, release what
follows.

The database is the source of truth; a run_task message is a hint that a task may be ready.
The claim and the record are compare-and-sets on the task row (statements.TAKE and RECORD),
so a duplicate or redelivered message finds the work taken and returns without doing anything.
"""

import json
import logging
import os
import time

import redis
import structlog
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import InterfaceError, OperationalError, connection
from django.db.models.functions import Now
from django.utils import timezone
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from agents.executors import TaskAborted, TaskContext, TaskFailed, TransientError
from agents.runtime import AgentRuntime
from orchestrator_project import logs, metrics
from orchestrator_project.redaction import redact, redact_data
from orchestrator_project.redis_client import redis_client
from sessions import feed
from sessions.models import ACTIVE, Session, broker_priority
from sessions.workspaces import workspace_of

from . import fairshare, statements
from .messages import FINALIZE_SESSION, MARK_SESSION_RUNNING, message
from .models import Task
from .release import RecordedDependents, abort_key, release_dependents, release_held, release_tasks, stop_open_tasks
from .routing import affinity_agent

logger = logging.getLogger(__name__)
log = structlog.get_logger(__name__)


class RetryTask(Exception):
    """Ask Celery to deliver the same message again after `countdown` seconds (None: back off)."""

    def __init__(self, countdown: float | None, reason: str):
        super().__init__(reason)
        self.countdown = countdown


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


def take_task(task_id, runtime: AgentRuntime, *, routing_settled: bool) -> tuple[Task | None, int | None]:
    """Load the task and, when nothing needs a closer look, claim it for this agent in the same
    statement (statements.TAKE); returns the task and the attempt claimed, or None.

    The task carries the columns of statements.LOAD_FIELDS and session_status,
    session_fail_fast, session_priority, session_version, session_tenant (its id) and
    upstream_agents (ids of the agents that ran its upstreams). `routing_settled`: routing has
    nothing left to decide (the message came on this agent's own queue, or routing already kept
    it here).
    """
    params = {
        "task": task_id,
        "agent": runtime.agent_id,
        "routing_settled": routing_settled,
        "lease": settings.TASK_LEASE_SECONDS,
        "pid": os.getpid(),
    }
    rows = statements.run(statements.TAKE, params)
    if not rows:
        return None, None
    (
        *values,
        session_status,
        session_fail_fast,
        session_priority,
        session_version,
        tenant,
        upstream_agents,
        attempt,
        now,
    ) = rows[0]
    task = Task.from_db(connection.alias, statements.LOAD_FIELDS, [values[i] for i in _MODEL_ORDER])
    task.params = json.loads(task.params)  # jsonb arrives as text, as Django's JSONField expects
    task.session_status, task.session_fail_fast = session_status, session_fail_fast
    task.session_priority, task.session_version, task.session_tenant = session_priority, session_version, tenant
    task.upstream_agents = upstream_agents
    if attempt is not None:
        task.attempts, task.status, task.agent_id = attempt, Task.Status.RUNNING, runtime.agent_id
        feed.announce(tenant, task.session_id)
        if attempt == 1 and task.queued_at is not None:
            # From ready to started, by the database's clock; a retry's wait is its back-off.
            metrics.TASK_SCHEDULE_TO_START.labels(task.capability).observe((now - task.queued_at).total_seconds())
    return task, attempt


def execute_task(*, task_id, runtime: AgentRuntime, delivered_to: str = "") -> str:
    """Claim, run and record one task on this agent; returns what happened, for the log."""
    task, attempt = take_task(task_id, runtime, routing_settled=not delivered_to.startswith("cap."))
    if task is None:
        return "gone"
    logs.bind(session_id=str(task.session_id), tenant=task.session_tenant, task_key=task.key)
    if attempt is None:
        # Not claimed at once: see why, and claim it if it can still be.
        if task.session_status not in ACTIVE:
            return f"session {task.session_status}"
        if task.status == Task.Status.PENDING:
            verdict, _ = release_tasks([task.pk])
            if verdict.get(task.pk) == Task.Status.SKIPPED:
                task.status = Task.Status.SKIPPED
                _release_what_follows(task)
                return "skipped"
            if task.pk not in verdict:
                # An upstream is still running (e.g. after a resume); poll instead of waiting on it.
                raise RetryTask(countdown=None, reason="upstream still running")
            task.status = Task.Status.QUEUED
        if task.status in Task.FINISHED:
            # A worker may have died between recording this task and releasing what follows;
            # releasing again is idempotent, so a redelivered message finishes the job.
            _release_what_follows(task)
            return "taken"
        if task.status == Task.Status.RUNNING:
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
            _ask_to_mark_session_running(task, runtime)
        return _run_claimed(task, attempt, runtime)
    except Exception:
        _end_claim_lease(task, attempt)
        raise


def _end_claim_lease(task: Task, attempt: int) -> None:
    """An error escaped after this process claimed the task: end the claim's lease now, so that
    Beat's reaper takes the task back (attempt + 1, with a note) instead of the lease being
    renewed for as long as this process lives. A task already recorded or re-queued is left."""
    try:
        this_claim = Task.objects.filter(
            pk=task.pk, status=Task.Status.RUNNING, attempts=attempt, worker_pid=os.getpid()
        )
        this_claim.update(lease_expires_at=timezone.now(), worker_pid=None)
    except Exception:
        logger.warning("task %s: could not end the lease of attempt %s", task.pk, attempt, exc_info=True)


def _own_lost_claim(task: Task, runtime: AgentRuntime) -> int | None:
    """The attempt of a claim this very process made but is not running: the claim's reply was
    lost (statements.run ran TAKE again), or recording the outcome failed and the message came
    back. A pool process runs one task at a time, so nobody runs it; and since this process
    lives, its lease would be renewed forever. It runs again under the same attempt."""
    this_process = Task.objects.filter(
        pk=task.pk, status=Task.Status.RUNNING, agent_id=runtime.agent_id, worker_pid=os.getpid()
    )
    attempt = this_process.values_list("attempts", flat=True).first()
    if attempt is not None:
        logger.warning("task %s: this process claimed attempt %s and lost track of it; running it", task.pk, attempt)
    return attempt


# (session id, version) of the queued sessions this process has asked to mark running.
_asked_to_mark_running: set[tuple] = set()


def _ask_to_mark_session_running(task: Task, runtime: AgentRuntime) -> None:
    """The first claim moves a queued session to running. The orchestrator does that (a lock
    and three writes) while this task runs, rather than this task before it runs. Asked once per
    process and queued spell (the version changes with every transition); more claims may land
    before it is done, and another process may ask too: a message that finds the session
    running already changes nothing."""
    asked = (task.session_id, task.session_version)
    if asked in _asked_to_mark_running:
        return
    if len(_asked_to_mark_running) >= 1000:
        _asked_to_mark_running.clear()
    _asked_to_mark_running.add(asked)
    mark_running = message(MARK_SESSION_RUNNING, str(task.session_id), task.key, runtime.name)
    try:
        mark_running.apply_async(priority=broker_priority(task.session_priority))
    except Exception:  # the broker is away: the stuck-session sweep, or settling, marks it running
        logger.warning("could not ask to mark session %s running", task.session_id, exc_info=True)


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
    attempt. It is TAKE with routing already decided."""
    _, attempt = take_task(task.pk, runtime, routing_settled=True)
    if attempt is not None:
        task.attempts, task.status, task.agent_id = attempt, Task.Status.RUNNING, runtime.agent_id
    return attempt


def task_timeout(task: Task) -> int:
    return task.timeout_seconds or settings.TASK_DEADLINE_SECONDS


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
        pinned_agent=task.pinned_agent,
    )


def _abort_requested(key: str) -> bool:
    try:
        return bool(redis_client().exists(key))
    except redis.RedisError:
        logger.warning("cannot reach Redis to check %s; the task goes on", key)
        return False  # Redis restarting must not stop the work; a later check sees a cancel


def _run_claimed(task: Task, attempt: int, runtime: AgentRuntime) -> str:
    """Run the executor and record how it ended. `cause` says whose doing a failure or a
    cancellation was (the metrics' orchestrator-fault SLO counts the orchestrator's)."""
    ctx = task_context(task, attempt)
    outcome, result, error, cause = Task.Status.FAILED, {}, "", "agent"
    started = time.monotonic()
    try:
        result = runtime.executor.execute(ctx)
        outcome, cause = Task.Status.COMPLETED, "none"
    except (TransientError, redis.ConnectionError, redis.TimeoutError) as exc:
        cause = "agent" if isinstance(exc, TransientError) else "orchestrator"
        return _retry_or_fail(task, attempt, str(exc), runtime=runtime, cause=cause, ran=time.monotonic() - started)
    except TaskFailed as exc:
        result, error = exc.result, str(exc)
    except TaskAborted as exc:
        outcome, error, cause = Task.Status.CANCELLED, f"aborted: {exc}", "user"
    except SoftTimeLimitExceeded:
        error = f"deadline of {ctx.timeout_s:g}s exceeded"
    except Exception as exc:
        # An executor bug must not kill the canvas: record it as the task's failure.
        logger.exception("executor %s crashed on task %s", runtime.executor_kind, task.pk)
        error, cause = f"executor error: {exc!r}", "orchestrator"
    ran = time.monotonic() - started
    if record_outcome(task, attempt, outcome, result=result, error=error):
        _report_finished(task, attempt, runtime, outcome, cause=cause, ran=ran, error=error)
    return outcome


def _report_finished(
    task: Task, attempt: int, runtime: AgentRuntime, outcome: str, *, cause: str, ran: float, error: str
):
    """The outcome this attempt recorded: its log line (docs/LOGGING.md) and its metrics."""
    log.info(
        "task.finished",
        task_id=str(task.pk),
        session_id=str(task.session_id),
        outcome=outcome,
        attempt=attempt,
        duration_s=round(ran, 3),
        error=error[:500],
    )
    labels = (task.capability, runtime.executor_kind, outcome)
    metrics.TASK_DURATION.labels(*labels).observe(ran)
    metrics.TASKS_FINISHED.labels(*labels, cause).inc()


def _retry_or_fail(task: Task, attempt: int, error: str, *, runtime: AgentRuntime, cause: str, ran: float) -> str:
    if attempt >= task.max_attempts:
        failed = f"gave up after {attempt} attempts: {error}"
        if record_outcome(task, attempt, Task.Status.FAILED, error=failed):
            _report_finished(task, attempt, runtime, Task.Status.FAILED, cause=cause, ran=ran, error=failed)
        return "failed"
    requeued = Task.objects.filter(pk=task.pk, status=Task.Status.RUNNING, attempts=attempt).update(
        status=Task.Status.QUEUED,
        error=redact(f"attempt {attempt} failed: {error}")[:5000],
        lease_expires_at=None,
        queued_at=Now(),
    )
    if not requeued:
        return "taken"
    feed.announce(task.session_tenant, task.session_id)
    log.warning("task.requeued", task_id=str(task.pk), attempt=attempt, error=error[:500])
    raise RetryTask(countdown=min(60.0, 2.0**attempt), reason=error)


def record_outcome(task: Task, attempt: int, status: str, *, result: dict | None = None, error: str = "") -> bool:
    """running -> completed|failed|cancelled for this attempt, then release what follows;
    returns whether the outcome is this attempt's (False: a newer attempt took the task over).

    `task` comes from take_task. The result and the error are the agent's output, hostile
    input: they are redacted here, before they are stored (docs/DATA.md). The outcome, its
    checkpoint and the dependents' bookkeeping are one statement (statements.RECORD); a stale
    attempt (the task was taken over) changes nothing. Dependents that wait for other upstreams
    too are released after that commit: two upstreams finishing at once must each see the
    other's committed status.
    """
    params = {
        "task": task.pk,
        "attempt": attempt,
        "status": status,
        "result": json.dumps(redact_data(result or {}), cls=DjangoJSONEncoder),
        "error": redact(error)[:5000],
    }
    [(recorded, *dependents)] = _record(params)
    if not recorded:
        # A stale attempt - or this one, if the statement committed and its reply was lost
        # (statements.run tried again): then release from the rows, as a redelivery does.
        # The error text tells this write from the reaper's, which keeps the attempt too.
        if Task.objects.filter(pk=task.pk, status=status, attempts=attempt, error=params["error"]).exists():
            task.status = status
            _release_what_follows(task)
            return True
        metrics.FENCING_REJECTIONS.labels("task", "record").inc()
        return False
    task.status = status
    try:
        if status == Task.Status.FAILED and task.required and task.session_fail_fast:
            reason = f"fail-fast: required task {task.key} failed"
            stop_open_tasks(task.session_id, reason=reason, revoke=False, cause="user")
            _release_what_follows(task)  # the dependents were just cancelled: release from the rows
        else:
            _release_what_follows(task, RecordedDependents(*dependents))
    finally:  # the outcome, and what it released
        feed.announce(task.session_tenant, task.session_id)
    return True


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


def _release_what_follows(task: Task, recorded: RecordedDependents | None = None) -> None:
    """Release or skip what follows a finished task, and finalize the session after its last task.

    Runs after the outcome is committed. If it fails (database or broker trouble), the message
    is delivered again: execute_task then finds the task finished and releases again.
    """
    try:
        if not release_dependents(task, recorded) and _last_to_finish(task):
            # The last task settles the session; the canvas's finalize_session may find it done.
            message(FINALIZE_SESSION, str(task.session_id)).apply_async(priority=broker_priority(task.session_priority))
        if fairshare.has_held(task.capability):  # its slot is free: a held task may go
            release_held(task.capability)
    except Exception as exc:
        logger.warning("releasing what follows task %s failed; will retry", task.pk, exc_info=True)
        raise RetryTask(countdown=2.0, reason=f"releasing what follows {task.key} failed: {exc!r}") from exc


def _last_to_finish(task: Task) -> bool:
    # Asked only when no dependent is left to run: building the query costs more Python than the
    # hot path of a zero-work task can spare (make bench, B1).
    return not Task.objects.filter(session_id=task.session_id, status__in=Task.UNFINISHED).exists()
