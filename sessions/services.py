"""Session workflows that cross apps: create with its DAG, and the operator's transitions."""

from django.conf import settings
from django.db import IntegrityError, transaction

from tasks.decomposition import plan_session
from tasks.models import Task
from tasks.services import release_ready_tasks, stop_open_tasks

from .models import ACTIVE, RETRYABLE, Session

S = Session.Status
TS = Task.Status


def create_session(*, tenant, user, data: dict, idempotency_key: str | None = None) -> tuple[Session, bool]:
    """Create a session and its task DAG in one transaction; returns (session, created).

    `data` is validated input (see SessionCreateSerializer): the DAG is its `tasks`, or else the
    decomposition of its requirements by the named or inferred template. With an idempotency key
    already used in this tenant, the existing session is returned and nothing is written. Raises
    tasks.dag.DagError when the decomposition cannot be used (see plan_session).
    """
    if idempotency_key:
        existing = Session.objects.filter(tenant=tenant, idempotency_key=idempotency_key).first()
        if existing:
            return existing, False
    plan = plan_session(
        requirements=data["requirements"],
        template=data.get("template"),
        tasks=data.get("tasks"),
        max_tasks=settings.MAX_TASKS_PER_SESSION,
    )
    try:
        with transaction.atomic():
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
    except IntegrityError:
        # Two requests with the same key raced; the other one's session is the answer.
        existing = Session.objects.filter(tenant=tenant, idempotency_key=idempotency_key).first()
        if idempotency_key and existing:
            return existing, False
        raise
    return session, True


def _create_tasks(session: Session, specs: list[dict]) -> None:
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
    from tasks.tasks import dispatch_session

    session_id = str(session.pk)
    transaction.on_commit(lambda: dispatch_session.apply_async((session_id,), priority=session.broker_priority))


def start_session(session: Session, *, actor: str) -> None:
    def queue_ready_tasks(row: Session) -> None:
        release_ready_tasks(row.pk)
        _dispatch_after_commit(row)

    pending = frozenset({S.PENDING})
    session.transition(S.QUEUED, reason="started", actor=actor, require_from=pending, effects=queue_ready_tasks)


def pause_session(session: Session, *, actor: str) -> None:
    # Running tasks finish; run_task starts nothing new while the session is paused.
    session.transition(S.PAUSED, reason="paused", actor=actor)


def resume_session(session: Session, *, actor: str) -> None:
    def target(row: Session) -> str:  # decided under the lock: a task may start or finish until then
        return S.RUNNING if row.tasks.filter(status=TS.RUNNING).exists() else S.QUEUED

    paused = frozenset({S.PAUSED})
    session.transition(target, reason="resumed", actor=actor, require_from=paused, effects=_dispatch_after_commit)


def cancel_session(session: Session, *, actor: str) -> None:
    """Cancel a session that has not run or is paused; stop one that is running."""

    def target(row: Session) -> str:  # decided under the lock: the first claim may come until then
        return S.STOPPED if row.status in ACTIVE - {S.QUEUED} else S.CANCELLED

    def cancel_open_tasks(row: Session) -> None:
        stop_open_tasks(row.pk, reason=f"session {row.status} by {actor}", revoke=True)

    session.transition(target, reason=f"cancel by {actor}", actor=actor, effects=cancel_open_tasks)


def retry_session(session: Session, *, actor: str) -> None:
    """Resume a failed, timed-out, stopped or orphaned session from its last checkpoint:
    completed tasks keep their results; everything else runs again."""

    def reset_unfinished_tasks(row: Session) -> None:
        fresh = {"status": TS.PENDING, "error": "", "agent": None, "started_at": None, "finished_at": None}
        row.tasks.exclude(status__in=(TS.COMPLETED, TS.RUNNING)).update(attempts=0, queued_at=None, **fresh)
        # A run still going from before the stop was told to abort; it is taken over. Its attempt
        # count stays, so the old run's outcome (recorded against its own attempt) changes nothing.
        row.tasks.filter(status=TS.RUNNING).update(queued_at=None, lease_expires_at=None, **fresh)
        release_ready_tasks(row.pk)
        _dispatch_after_commit(row)

    session.transition(
        S.QUEUED, reason=f"retry by {actor}", actor=actor, require_from=RETRYABLE, effects=reset_unfinished_tasks
    )
