"""A session's life across its tasks: create it with its DAG, start, pause, resume, cancel and
retry it, dispatch its DAG, mark it running at the first claim, and settle it once no task can
run any more. Every status change goes through Session.transition (sessions/models.py)."""

import logging

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q

from agents.models import Agent
from orchestrator_project import logs
from orchestrator_project.locking import LockUnavailable
from orchestrator_project.redaction import redact_data
from orchestrator_project.validation import InvalidInput
from sessions import feed
from sessions.models import ACTIVE, RETRYABLE, Session
from sessions.workspaces import WorkspaceError, check_repository, finish_workspace, prepare_workspace

from . import quotas
from .canvas import build_canvas
from .decomposition import Plan, plan_session
from .messages import DISPATCH_SESSION, message
from .models import Task
from .release import release_held, release_ready_tasks, send_released, stop_open_tasks

logger = logging.getLogger(__name__)


def check_new_session(data: dict, *, tenant=None) -> None:
    """The checks of a new session's input (validated in shape, see api/inputs.py) that need the
    database or git: pinned agents must be registered workers, or external agents of the tenant,
    with the task's capability, a
    repository must be usable by the tenant (the settings' roots and URL prefixes as the tenant
    narrows them; the settings' alone without a tenant). Replaces data["repository"] with its
    normalised form, the one that was checked. Raises InvalidInput naming every bad pin, or the
    repository or base branch."""
    specs = data.get("tasks") or []
    # Whether a pinned agent is online is a runtime matter (the session turns degraded). Our
    # workers have an agent.<name> queue; the tenant's external agents are reached through an
    # EAP gateway (EAP_PINNED_QUEUE); another tenant's do not exist for this one.
    pinned = {spec["agent"] for spec in specs if "agent" in spec}
    pinnable = Q(mode=Agent.Mode.WORKER) | (Q(tenant=tenant) if tenant is not None else Q(pk__in=[]))
    agents = Agent.objects.filter(pinnable, name__in=pinned)
    capabilities_of = dict(agents.values_list("name", "capabilities")) if pinned else {}
    bad_pins = {
        f"tasks[{index}].agent": why
        for index, spec in enumerate(specs)
        if "agent" in spec and (why := _why_not_pinnable(spec, capabilities_of.get(spec["agent"])))
    }
    if bad_pins:
        (path, message), *more = bad_pins.items()
        raise InvalidInput(path, message, more=dict(more))
    if "repository" in data:
        try:
            data["repository"] = check_repository(data["repository"], data.get("base_branch", ""), tenant=tenant)
        except WorkspaceError as exc:
            raise InvalidInput(exc.field, str(exc)) from None


def _why_not_pinnable(spec: dict, capabilities: list[str] | None) -> str | None:
    name = spec["agent"]
    if capabilities is None:
        return f"no agent named {name!r} is registered"
    if spec["capability"] not in capabilities:
        return f"agent {name!r} does not have capability {spec['capability']!r}"
    return None


def plan_new_session(data: dict) -> Plan:
    """The DAG a session created from `data` gets: its `tasks`, or the decomposition of its
    requirements by the named or inferred template. Raises DagError (an InvalidInput) when the
    decomposition cannot be used (plan_session)."""
    return plan_session(
        requirements=data["requirements"],
        template=data.get("template"),
        tasks=data.get("tasks"),
        max_tasks=settings.MAX_TASKS_PER_SESSION,
    )


def create_session(
    *, tenant, user, data: dict, idempotency_key: str | None = None, role: str | None = None
) -> tuple[Session, bool]:
    """Create a session and its task DAG in one transaction; returns (session, created).

    `data` is validated input (see api/inputs.py), checked here (check_new_session); the DAG
    is its `tasks`, or else the decomposition of its requirements (plan_new_session). Both raise
    InvalidInput. With an idempotency key already used in this tenant, the existing session is
    returned and nothing is written, whatever the quotas. Otherwise the tenant's quotas must
    allow it (tasks/quotas.py; the priority cap of `role`, None for internal callers), or
    QuotaExceeded is raised and nothing is written.
    """
    check_new_session(data, tenant=tenant)
    if idempotency_key and (existing := _session_with_key(tenant, idempotency_key)):
        return existing, False
    plan = plan_new_session(data)
    quotas.check_request(tenant, tasks=len(plan.tasks), priority=data["priority"], role=role)
    try:
        with transaction.atomic():
            tenant = quotas.lock_tenant(tenant.pk)
            # Under the lock: a request with the same key that was first has committed by now.
            if idempotency_key and (existing := _session_with_key(tenant, idempotency_key)):
                return existing, False
            quotas.check_usage(tenant, sessions=1, tasks=len(plan.tasks))
            session = Session.objects.create(
                tenant=tenant,
                created_by=user,
                title=data["title"],
                requirements=data["requirements"],
                priority=data["priority"],
                timeout_seconds=data["timeout_seconds"],
                max_retries=data["max_retries"],
                fail_fast=data.get("fail_fast", False),
                metadata=data.get("metadata") or {},
                template=plan.template,
                repository=data.get("repository", ""),
                base_branch=data.get("base_branch", ""),
                idempotency_key=idempotency_key or None,
            )
            _create_tasks(session, plan.tasks)
            transaction.on_commit(lambda: feed.announce(tenant.pk, session.pk))  # the tenant's live lists
    except IntegrityError:
        # Two requests with the same key raced; the other one's session is the answer.
        existing = _session_with_key(tenant, idempotency_key) if idempotency_key else None
        if existing:
            return existing, False
        raise
    return session, True


def _session_with_key(tenant, idempotency_key: str) -> Session | None:
    return Session.objects.filter(tenant=tenant, idempotency_key=idempotency_key).first()


def _create_tasks(session: Session, specs: list[dict]) -> None:
    pinned = {spec["agent"] for spec in specs if "agent" in spec}
    external = set(
        Agent.objects.filter(name__in=pinned, tenant=session.tenant_id).exclude(mode=Agent.Mode.WORKER)
        .values_list("name", flat=True)
    ) if pinned else set()  # fmt: skip
    tasks = Task.objects.bulk_create(
        Task(
            session=session,
            key=spec["key"],
            title=spec["title"],
            capability=spec["capability"],
            required=spec.get("required", True),
            instructions=spec.get("instructions", ""),
            params=spec.get("params") or {},
            max_attempts=spec.get("max_attempts", 3),
            pinned_agent=spec.get("agent", ""),
            pinned_via_gateway=spec.get("agent") in external,
            timeout_seconds=spec.get("timeout_seconds"),
            upstream_open=len(spec.get("depends_on", [])),
            position=position,
            **_estimate_fields(spec.get("estimate")),
        )
        for position, spec in enumerate(specs)
    )
    by_key = {task.key: task for task in tasks}
    Edge = Task.depends_on.through
    Edge.objects.bulk_create(
        Edge(from_task_id=by_key[spec["key"]].pk, to_task_id=by_key[dep].pk)
        for spec in specs
        for dep in spec.get("depends_on", [])
    )


def _estimate_fields(estimate: dict | None) -> dict[str, float]:
    if not estimate:
        return {}  # the model's default estimate
    return {
        "estimate_optimistic_h": estimate["optimistic"],
        "estimate_likely_h": estimate["likely"],
        "estimate_pessimistic_h": estimate["pessimistic"],
    }


def _dispatch_after_commit(session: Session) -> None:
    dispatch = message(DISPATCH_SESSION, str(session.pk))
    transaction.on_commit(lambda: dispatch.apply_async(priority=session.broker_priority))


def start_session(session: Session, *, actor: str) -> None:
    def queue_ready_tasks(row: Session) -> None:
        release_ready_tasks(row.pk)
        _dispatch_after_commit(row)

    pending = frozenset({Session.Status.PENDING})
    session.transition(
        Session.Status.QUEUED, reason="started", actor=actor, require_from=pending, effects=queue_ready_tasks
    )


def pause_session(session: Session, *, actor: str) -> None:
    # Running tasks finish; run_task starts nothing new while the session is paused.
    session.transition(Session.Status.PAUSED, reason="paused", actor=actor)


def resume_session(session: Session, *, actor: str) -> None:
    def target(row: Session) -> str:  # decided under the lock: a task may start or finish until then
        return (
            Session.Status.RUNNING if row.tasks.filter(status=Task.Status.RUNNING).exists() else Session.Status.QUEUED
        )

    paused = frozenset({Session.Status.PAUSED})
    session.transition(target, reason="resumed", actor=actor, require_from=paused, effects=_dispatch_after_commit)


def cancel_target(status: str) -> str:
    """Where cancelling a session in `status` takes it: stopped if it runs, cancelled otherwise."""
    return Session.Status.STOPPED if status in ACTIVE - {Session.Status.QUEUED} else Session.Status.CANCELLED


def cancel_session(session: Session, *, actor: str) -> None:
    """Cancel a session that has not run or is paused; stop one that is running."""

    def target(row: Session) -> str:  # decided under the lock: the first claim may come until then
        return cancel_target(row.status)

    def cancel_open_tasks(row: Session) -> None:
        stop_open_tasks(row.pk, reason=f"session {row.status} by {actor}", revoke=True, cause="user")

    session.transition(target, reason=f"cancel by {actor}", actor=actor, effects=cancel_open_tasks)


def retry_session(session: Session, *, actor: str) -> None:
    """Run a failed, timed-out, stopped or orphaned session again: completed tasks keep their
    status and results and do not run again; every other task starts over. Raises QuotaExceeded
    (and changes nothing) when the tenant's quotas have no room for it."""

    def reset_unfinished_tasks(row: Session) -> None:
        # Back among the unsettled: the tenant's quotas must have room for it and for the tasks
        # that will run again (the tenant locked after the session: creates lock no session).
        again = row.tasks.exclude(status=Task.Status.COMPLETED).count()
        quotas.check_usage(quotas.lock_tenant(row.tenant_id), sessions=1, tasks=again, excluding=row)
        fresh = {"status": Task.Status.PENDING, "error": "", "agent": None, "started_at": None, "finished_at": None}
        to_run_again = row.tasks.exclude(status__in=(Task.Status.COMPLETED, Task.Status.RUNNING))
        to_run_again.update(attempts=0, queued_at=None, **fresh)
        # A run still going from before the stop was told to abort; it is taken over. Its attempt
        # count stays, so the old run's outcome (recorded against its own attempt) changes nothing.
        row.tasks.filter(status=Task.Status.RUNNING).update(queued_at=None, lease_expires_at=None, **fresh)
        # Its canvas is over: until dispatch decides again, what it queues is no backlog.
        type(row).objects.filter(pk=row.pk).update(canvas_backlog=False)
        release_ready_tasks(row.pk)
        _dispatch_after_commit(row)

    session.transition(
        Session.Status.QUEUED,
        reason=f"retry by {actor}",
        actor=actor,
        require_from=RETRYABLE,
        effects=reset_unfinished_tasks,
    )


@logs.keeps_context
def dispatch_session(session_id) -> bool:
    """Send the session's unfinished DAG: a canvas for its series-parallel part, single messages
    for the tasks the database releases that are ready now. Returns whether anything was sent."""
    session = Session.objects.select_related("tenant").filter(pk=session_id).first()  # its weight: build_canvas
    if session is None or session.status not in ACTIVE:
        return False
    logs.bind(tenant=session.tenant_id)
    if session.repository and not prepare_workspace_or_fail(session):
        return False
    canvas, released = build_canvas(session)
    if canvas is None and not released:
        settle_session(session_id)
        return False
    if canvas is not None:
        canvas.apply_async()
    # Read now, not when compiled: an upstream that finished while the canvas was built may
    # have queued a task before it was marked as released (and so sent nothing). A duplicate
    # message is harmless.
    send_released([t.pk for t in released])
    return True


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
        stop_open_tasks(row.pk, reason=reason, revoke=True, cause="orchestrator")

    logger.warning("session %s: %s", session.pk, reason)
    session.transition(Session.Status.FAILED, reason=reason, actor="orchestrator", only_from=ACTIVE, effects=stop_tasks)
    return False


@logs.keeps_context
def mark_session_running(session_id, key: str, agent_name: str) -> bool:
    """queued -> running: the session's first task (`key`) was claimed by `agent_name`.
    Nothing happens if the session has moved on meanwhile (a later claim, a pause, settling)."""
    session = Session.objects.filter(pk=session_id).first()
    if session is None or session.status != Session.Status.QUEUED:
        return False
    logs.bind(tenant=session.tenant_id)
    event = session.transition(
        Session.Status.RUNNING,
        reason=f"task {key} claimed by {agent_name}",
        actor=f"agent:{agent_name}",
        only_from=frozenset({Session.Status.QUEUED}),
    )
    return event is not None


@logs.keeps_context
def settle_session(session_id) -> str | None:
    """Once no task can run any more, move an active session to its outcome."""
    session = Session.objects.get(pk=session_id)
    if session.status not in ACTIVE:
        return None
    logs.bind(tenant=session.tenant_id)
    tasks = list(Task.objects.filter(session_id=session_id).only("key", "status", "required"))
    if any(t.status in Task.UNFINISHED for t in tasks):
        return None
    counts = task_counts(tasks)
    if any(t.required and t.status != Task.Status.COMPLETED for t in tasks):
        outcome, reason = Session.Status.FAILED, "a required task did not complete"
    elif all(t.status == Task.Status.COMPLETED for t in tasks):
        outcome, reason = Session.Status.COMPLETED, f"all {len(tasks)} tasks completed"
    else:
        outcome, reason = Session.Status.PARTIALLY_COMPLETED, "every required task completed; some optional did not"
    if session.status == Session.Status.QUEUED:
        queued = frozenset({Session.Status.QUEUED})
        session.transition(Session.Status.RUNNING, reason="settling", only_from=queued)
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
        # The diff is what the agents wrote: redacted before it is stored (docs/DATA.md).
        row.result = {**row.result, **redact_data(summary)}
        row.save(update_fields=["result"])

    event = session.transition(outcome, reason=reason, only_from=ACTIVE, effects=store_summary)
    for capability in session.canvas_width if event else ():  # its canvas's share is free again
        release_held(capability)
    return outcome if event else None


def task_counts(tasks) -> dict[str, int]:
    counts = dict.fromkeys(Task.Status.values, 0)
    for task in tasks:
        counts[task.status] += 1
    return counts
