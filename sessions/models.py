import bisect
import logging
import uuid
from collections.abc import Callable
from datetime import timedelta

import structlog
from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models, transaction
from django.urls import reverse
from django.utils import timezone

from orchestrator_project import metrics
from orchestrator_project.locking import LockUnavailable
from orchestrator_project.validation import MAX_PRIORITY

from . import feed
from .locking import session_lock

logger = logging.getLogger(__name__)
log = structlog.get_logger(__name__)


class InvalidTransition(Exception):
    """A session cannot move from its current status to the requested one (HTTP 409)."""

    def __init__(self, session_id, from_status: str, to_status: str, allowed: list[str], why: str = ""):
        self.session_id = session_id
        self.from_status = from_status
        self.to_status = to_status
        self.allowed = allowed
        detail = why or f"allowed from {from_status}: {', '.join(allowed) or 'none (terminal)'}"
        super().__init__(f"cannot move session from {from_status} to {to_status}; {detail}")


class Status(models.TextChoices):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DEGRADED = "degraded"
    PAUSED = "paused"
    COMPLETED = "completed"
    PARTIALLY_COMPLETED = "partially_completed"
    FAILED = "failed"
    TIMEOUT = "timeout"
    STOPPED = "stopped"
    CANCELLED = "cancelled"
    ORPHANED = "orphaned"


_RUN_OUTCOMES = {
    Status.COMPLETED,
    Status.PARTIALLY_COMPLETED,
    Status.FAILED,
    Status.TIMEOUT,
    Status.PAUSED,
    Status.STOPPED,
    Status.ORPHANED,
}

# The only legal moves (docs/ARCHITECTURE.md). Anything else raises InvalidTransition.
TRANSITIONS: dict[str, frozenset[str]] = {
    Status.PENDING: frozenset({Status.QUEUED, Status.CANCELLED, Status.FAILED}),
    Status.QUEUED: frozenset({Status.RUNNING, Status.PAUSED, Status.CANCELLED, Status.FAILED, Status.ORPHANED}),
    Status.RUNNING: frozenset(_RUN_OUTCOMES | {Status.DEGRADED}),
    Status.DEGRADED: frozenset(_RUN_OUTCOMES | {Status.RUNNING}),
    Status.PAUSED: frozenset({Status.QUEUED, Status.RUNNING, Status.STOPPED, Status.CANCELLED}),
    Status.FAILED: frozenset({Status.QUEUED}),
    Status.TIMEOUT: frozenset({Status.QUEUED}),
    Status.STOPPED: frozenset({Status.QUEUED}),
    Status.ORPHANED: frozenset({Status.QUEUED}),
    Status.COMPLETED: frozenset(),
    Status.PARTIALLY_COMPLETED: frozenset(),
    Status.CANCELLED: frozenset(),
}
TERMINAL = frozenset(status for status, targets in TRANSITIONS.items() if not targets)
RETRYABLE = frozenset({Status.FAILED, Status.TIMEOUT, Status.STOPPED, Status.ORPHANED})
# Settled: no task of the session may start while the session is in one of these.
SETTLED = TERMINAL | RETRYABLE
ACTIVE = frozenset({Status.QUEUED, Status.RUNNING, Status.DEGRADED})


# The bounds of what a client may ask of a session (api/inputs.py). The fields' validators repeat
# them for the admin's form, which edits a pending session's parameters (tasks/admin.py).
MAX_TIMEOUT_SECONDS = 7 * 86400
MAX_RETRIES = 10


def broker_priority(priority: int) -> int:
    """The broker priority of a session priority (9 most urgent in our API): the Redis transport
    consumes 0 first, RabbitMQ 9 (settings.BROKER_PRIORITY_INVERTED)."""
    return 9 - priority if settings.BROKER_PRIORITY_INVERTED else priority


class SessionQuerySet(models.QuerySet):
    def search(self, words: str) -> "SessionQuerySet":
        """Sessions with `words` in the title or the requirements, in any case (the API's
        ?search= and the console's text filter)."""
        return self.filter(models.Q(title__icontains=words) | models.Q(requirements__icontains=words))


class Session(models.Model):
    Status = Status

    id = models.UUIDField("ID", primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="sessions")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    title = models.CharField(max_length=200)
    requirements = models.TextField()
    status = models.CharField(max_length=24, choices=Status.choices, default=Status.PENDING, db_index=True)
    version = models.PositiveIntegerField(default=0)
    # API priority 0..9, 9 most urgent; see broker_priority.
    priority = models.PositiveSmallIntegerField(default=5, validators=[MaxValueValidator(MAX_PRIORITY)])
    timeout_seconds = models.PositiveIntegerField(
        default=3600, validators=[MinValueValidator(1), MaxValueValidator(MAX_TIMEOUT_SECONDS)]
    )
    deadline = models.DateTimeField(null=True, blank=True)
    max_retries = models.PositiveSmallIntegerField(default=3, validators=[MaxValueValidator(MAX_RETRIES)])
    retry_count = models.PositiveSmallIntegerField(default=0)
    # NULL, not "", for "no key": the unique constraint must ignore sessions without one.
    idempotency_key = models.CharField(max_length=128, null=True, blank=True)  # noqa: DJ001
    fencing_token = models.BigIntegerField(default=0)
    metadata = models.JSONField(default=dict, blank=True)
    # The decomposition template the DAG came from ("" for a client-sent DAG).
    template = models.CharField(max_length=40, blank=True)
    # On the first failed required task, cancel everything that has not started.
    fail_fast = models.BooleanField(default=False)
    result = models.JSONField(default=dict, blank=True)
    # The git repository its tasks work on (an absolute path or a git URL; "" for none), and the
    # branch to start from ("" for the repository's current one). sessions.workspaces.
    repository = models.CharField(max_length=1000, blank=True)
    base_branch = models.CharField(max_length=200, blank=True)
    # Set when the workspace is made: the commit its branch (workspace_branch) started from.
    base_commit = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    # The peak width per capability of the canvas the session runs, which had to fit its tenant's
    # fair share when it was dispatched (tasks.fairshare); {} when it runs no canvas.
    canvas_width = models.JSONField(default=dict, blank=True, editable=False)
    # Whether that canvas is a lone tenant's backlog, sent whole below every share's broker
    # priority (tasks.fairshare); its nodes count against no share.
    canvas_backlog = models.BooleanField(default=False, editable=False)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = SessionQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="unique_idempotency_key_per_tenant",
            ),
            models.CheckConstraint(condition=models.Q(priority__lte=MAX_PRIORITY), name="priority_0_to_9"),
        ]
        indexes = [
            models.Index(fields=["tenant", "status"]),
            # Retention looks for the oldest settled sessions: a range of this index, not every row.
            models.Index(
                fields=["finished_at"], condition=models.Q(finished_at__isnull=False), name="session_finished"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.title} ({self.status})"

    def get_absolute_url(self) -> str:
        """The session's page in the console (the admin links to it: "View on site")."""
        return reverse("console:session", args=[self.pk])

    @property
    def branch(self) -> str:
        """The git branch of the session's workspace (sessions.workspaces)."""
        return f"io/session-{self.pk.hex[:12]}"

    @property
    def workspace_branch(self) -> str:
        """The session's own branch, once its workspace is made ("" before)."""
        return self.branch if self.base_commit else ""

    @property
    def broker_priority(self) -> int:
        return broker_priority(self.priority)

    @property
    def retries_left(self) -> bool:
        return self.retry_count < self.max_retries

    def allowed_targets(self) -> list[str]:
        return sorted(TRANSITIONS[self.status])

    def check_transition(self, to: str) -> None:
        if to not in TRANSITIONS[self.status]:
            raise InvalidTransition(self.pk, self.status, to, self.allowed_targets())
        if self.status in RETRYABLE and to == Status.QUEUED and not self.retries_left:
            raise InvalidTransition(
                self.pk, self.status, to, [], why=f"retry limit reached ({self.retry_count}/{self.max_retries})"
            )

    def transition(
        self,
        to: "str | Callable[[Session], str | None]",
        *,
        reason: str,
        actor: str = "system",
        only_from: frozenset[str] | None = None,
        require_from: frozenset[str] | None = None,
        effects: Callable[["Session"], None] | None = None,
    ) -> "SessionEvent | None":
        """Move the session to `to`: the one way any status changes.

        Lock (fencing token) -> row lock -> validate -> write row + event -> commit -> announce
        -> release. `to` may be a function of the locked row, for a target that depends on the
        status at that moment (None: leave the session alone). `effects(locked_row)` runs
        inside the same transaction, for work that must commit with the transition. With
        `only_from`, a session that is no longer in one of those statuses is left alone and None
        is returned: for workers that race each other. With `require_from`, any other status is
        an InvalidTransition: for an operation that means something only from those (resume:
        from paused).
        """
        with session_lock(self.pk) as lease, transaction.atomic():
            row = Session.objects.select_for_update().get(pk=self.pk)
            if only_from is not None and row.status not in only_from:
                return None
            to = to(row) if callable(to) else to
            if to is None:  # the function found nothing to do
                return None
            if require_from is not None and row.status not in require_from:
                why = f"only from {', '.join(sorted(require_from))}"
                raise InvalidTransition(self.pk, row.status, to, row.allowed_targets(), why=why)
            row.check_transition(to)
            token = lease.check_against(row.fencing_token)
            event = row._write_transition(to, reason=reason, actor=actor, token=token)
            if effects is not None:
                effects(row)
            transaction.on_commit(lambda: _committed(event, tenant=row.tenant_id))
        self.refresh_from_db()
        return event

    def note(self, reason: str, *, actor: str = "system") -> "SessionEvent | None":
        """Write a recovery (a re-queued task, say) into the event log without a status change:
        an event from the current status to itself, which replaying the log passes over.

        The recovery has committed already: should the session's lock stay busy, the note is
        logged instead (None), and the sweep that wrote it goes on."""
        try:
            return self._write_note(reason, actor)
        except LockUnavailable:
            logger.warning("session %s: lock busy, note not written: %s", self.pk, reason)
            return None

    def _write_note(self, reason: str, actor: str) -> "SessionEvent":
        with session_lock(self.pk), transaction.atomic():
            row = Session.objects.select_for_update().get(pk=self.pk)
            event = SessionEvent.objects.create(
                session=row,
                from_status=row.status,
                to_status=row.status,
                reason=reason[:500],
                actor=actor[:100],
                fencing_token=row.fencing_token,
                version=row.version,
            )
            transaction.on_commit(lambda: feed.announce(row.tenant_id, row.pk))
        return event

    def _write_transition(self, to: str, *, reason: str, actor: str, token: int) -> "SessionEvent":
        from_status = self.status
        now = timezone.now()
        self.status = to
        self.version += 1
        self.fencing_token = token
        fields = ["status", "version", "fencing_token", "updated_at"]
        if to == Status.QUEUED and from_status != Status.PAUSED:  # start or retry: a new deadline
            if from_status in RETRYABLE:
                self.retry_count += 1
                fields.append("retry_count")
            self.deadline = now + timedelta(seconds=self.timeout_seconds)
            self.finished_at = None
            fields += ["deadline", "finished_at"]
        if from_status == Status.PAUSED and self.deadline is not None and to in ACTIVE:
            # The deadline does not run while the session is paused.
            paused_at = (
                self.events.filter(to_status=Status.PAUSED).exclude(from_status=Status.PAUSED).latest("id").created_at
            )
            self.deadline += now - paused_at
            fields.append("deadline")
        if to == Status.RUNNING and self.started_at is None:
            self.started_at = now
            fields.append("started_at")
        if to in SETTLED:
            self.finished_at = now
            fields.append("finished_at")
        self.save(update_fields=fields)
        return SessionEvent.objects.create(
            session=self,
            from_status=from_status,
            to_status=to,
            reason=reason[:500],
            actor=actor[:100],
            fencing_token=token,
            version=self.version,
        )


class SessionEvent(models.Model):
    """Append-only audit log of session transitions; replaying it gives the row's status."""

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="events")
    from_status = models.CharField(max_length=24, choices=Status.choices)
    to_status = models.CharField(max_length=24, choices=Status.choices)
    reason = models.CharField(max_length=500)
    actor = models.CharField(max_length=100)
    fencing_token = models.BigIntegerField()
    version = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.from_status} -> {self.to_status}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValueError("session events are append-only")
        super().save(*args, **kwargs)


class FeedEvent(models.Model):
    """One change a live page shows, for the event streams (sessions/feed.py): a session created,
    a session's transition or note, a task's change of status.

    Written by PostgreSQL triggers (migrations 0009 here and 0011 in tasks), in the transaction
    of the change itself: no code path can forget one, and none is seen before its change is.
    `txid` is that transaction's id (pg_current_xact_id): the streams order by commit with it,
    since ids from a sequence can commit out of order. Read-only to Python."""

    class Kind(models.TextChoices):
        SESSION = "session"
        TASK = "task"

    txid = models.BigIntegerField()
    tenant_id = models.BigIntegerField()
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="+")
    task_id = models.UUIDField(null=True, blank=True)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    # session: from, to, reason, actor, version; task: key, from, to, attempt, agent, error.
    data = models.JSONField()
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["session", "txid"], name="feed_session_txid"),
            models.Index(fields=["tenant_id", "txid"], name="feed_tenant_txid"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.data.get('from')} -> {self.data.get('to')}"


def _committed(event: SessionEvent, *, tenant) -> None:
    """Once a transition has committed: its count, its log line (docs/LOGGING.md), and the
    event streams woken (sessions/feed.py)."""
    metrics.SESSION_TRANSITIONS.labels(event.from_status, event.to_status).inc()
    log.info(
        "session.transition",
        session_id=str(event.session_id),
        tenant=tenant,
        from_status=event.from_status,
        to_status=event.to_status,
        reason=event.reason,
        actor=event.actor,
        version=event.version,
    )
    feed.announce(tenant, event.session_id)


class Checkpoint(models.Model):
    """The audit trail of a session's completions: one row per task it completed, in order,
    written in the same statement as the completion (tasks/statements.py, RECORD). The API lists
    them, each with the keys completed up to it (completed_keys). Nothing decides anything from
    them: retry works from the tasks' statuses (a completed task stays completed and does not
    run again). Storing one task per row, and deriving the list when read, keeps the write
    constant-time however large the session."""

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="checkpoints")
    task = models.ForeignKey("tasks.Task", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"checkpoint {self.pk} of {self.session_id}"

    @staticmethod
    def completed_keys(checkpoints) -> dict[int, list[str]]:
        """For each of `checkpoints` (of one session), the sorted keys of the tasks completed up
        to and including it."""
        checkpoints = list(checkpoints)
        if not checkpoints:
            return {}
        last = max(c.pk for c in checkpoints)
        wanted = {c.pk for c in checkpoints}
        so_far: list[str] = []
        result = {}
        history = Checkpoint.objects.filter(session_id=checkpoints[0].session_id, pk__lte=last)
        for pk, key in history.order_by("pk").values_list("pk", "task__key"):
            if key is not None:
                bisect.insort(so_far, key)
            if pk in wanted:
                result[pk] = list(so_far)
        return result
