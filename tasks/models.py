import uuid

from django.db import models
from django.db.models import Q

from agents.capabilities import CAPABILITIES, EAP_PINNED_QUEUE, capability_queue

from .dag import pert_hours

# Fair share's held tasks (tasks/fairshare.py): queued on a shared queue with no message out,
# waiting in the database for their tenant's share of the slots. The hot path asks for them in SQL
# (fairshare.HAS_HELD, whose condition must stay this one for the task_held index to answer it,
# and fairshare.LOADS): a change here changes those too (test_fairshare holds HAS_HELD to it).
HELD = Q(status="queued", message_id="", via_canvas=False, pinned_agent="")


class Task(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"  # waiting for its dependencies
        QUEUED = "queued"  # ready; a run_task message is (or will be) on its queue
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"
        SKIPPED = "skipped"  # a required upstream failed, was skipped or cancelled
        CANCELLED = "cancelled"

    FINISHED = frozenset({Status.COMPLETED, Status.FAILED, Status.SKIPPED, Status.CANCELLED})
    UNFINISHED = frozenset({Status.PENDING, Status.QUEUED, Status.RUNNING})

    id = models.UUIDField("ID", primary_key=True, default=uuid.uuid4, editable=False)
    # Indexed by (session, status) and (session, key) below; an index of its own would only be
    # one more to update with every status change.
    session = models.ForeignKey(
        "agent_sessions.Session", on_delete=models.CASCADE, related_name="tasks", db_index=False
    )
    key = models.CharField(max_length=64)
    title = models.CharField(max_length=200)
    instructions = models.TextField(blank=True)
    capability = models.CharField(max_length=40, choices=[(c, c) for c in CAPABILITIES])
    required = models.BooleanField(default=True)
    params = models.JSONField(default=dict, blank=True)
    depends_on = models.ManyToManyField("self", symmetrical=False, related_name="dependents", blank=True)
    # Looked up by session or agent with the status (indexes below), never by status alone.
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    # How many upstream tasks have not finished yet. Each upstream's finish lowers it in the same
    # statement that records the finish, so reaching 0 is the moment to release this task
    # (tasks/statements.py); start and retry count again. Exact while the task can still run
    # (one being skipped because several upstreams were skipped together may be lowered once).
    upstream_open = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveSmallIntegerField(default=3)
    # Indexed below: with finished_at (its latest finishes), and its running tasks.
    agent = models.ForeignKey(
        "agents.Agent", null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks", db_index=False
    )
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    position = models.PositiveIntegerField(default=0)
    # PERT estimate in hours; expected duration = (o + 4m + p) / 6.
    estimate_optimistic_h = models.FloatField("optimistic estimate (h)", default=1.0)
    estimate_likely_h = models.FloatField("likely estimate (h)", default=1.0)
    estimate_pessimistic_h = models.FloatField("pessimistic estimate (h)", default=1.0)
    # When set, the task runs only on this agent (queue agent.<name>).
    pinned_agent = models.CharField(max_length=100, blank=True)
    # The pinned agent is an external one (EAP): an EAP gateway hands the task to it.
    pinned_via_gateway = models.BooleanField(default=False)
    # Per-task deadline; None means settings.TASK_DEADLINE_SECONDS.
    timeout_seconds = models.PositiveIntegerField(null=True, blank=True)
    # False for tasks whose run_task message is sent when the database releases them (the parts
    # of a DAG that a canvas cannot express without a barrier), True for canvas nodes.
    via_canvas = models.BooleanField(default=True)
    # The id of the last run_task message sent for this task, so cancel can revoke it.
    message_id = models.CharField("message ID", max_length=64, blank=True)
    # The queue that message went to; a sweep re-routes one stranded on a dead agent's queue.
    dispatched_to = models.CharField(max_length=120, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # The worker process that claimed it (on its agent's host): its lease lives as long as it does.
    worker_pid = models.PositiveIntegerField("worker PID", null=True, blank=True)

    class Meta:
        # By the column, not the relation: ordering by "session" joins sessions into every query.
        ordering = ["session_id", "position"]
        indexes = [
            models.Index(fields=["session", "status"], name="task_session_status"),
            # An agent's latest finishes (its heartbeat's counters).
            models.Index(fields=["agent", "finished_at"], name="task_agent_finished"),
            # Partial indexes hold only the tasks in flight, so that what looks for those (routing
            # and heartbeats counting an agent's load, leases, the sweeps) costs the same however
            # many finished tasks are stored.
            models.Index(fields=["agent"], condition=Q(status="running"), name="task_running_agent"),
            models.Index(fields=["lease_expires_at"], condition=Q(status="running"), name="task_running_lease"),
            models.Index(fields=["queued_at"], condition=Q(status="queued"), name="task_queued"),
            # Fair share counts what each tenant has in flight per capability, and its held tasks.
            models.Index(
                fields=["capability"], condition=Q(status__in=["queued", "running"]), name="task_open_capability"
            ),
            # Whether anything is held for a capability, asked after every finish: an index of the
            # held tasks alone answers it at once, however much else is queued (a backlog canvas).
            models.Index(fields=["capability"], condition=HELD, name="task_held"),
            models.Index(fields=["session"], condition=Q(status="pending", upstream_open=0), name="task_unblocked"),
        ]
        constraints = [models.UniqueConstraint(fields=["session", "key"], name="unique_task_key_per_session")]

    def __str__(self) -> str:
        return f"{self.key} ({self.status})"

    @property
    def queue(self) -> str:
        if self.pinned_via_gateway:
            return EAP_PINNED_QUEUE
        return f"agent.{self.pinned_agent}" if self.pinned_agent else capability_queue(self.capability)

    @property
    def expected_hours(self) -> float:
        return pert_hours(self.estimate_optimistic_h, self.estimate_likely_h, self.estimate_pessimistic_h)


def running() -> Q:
    """Running tasks; the partial index task_running_agent holds exactly these."""
    return Q(finished_at__isnull=True, status=Task.Status.RUNNING)
