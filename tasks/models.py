import uuid

from django.db import models

CAPABILITIES = (
    "requirements_analysis",
    "system_design",
    "architecture_planning",
    "task_decomposition",
    "code_generation",
    "test_generation",
    "testing",
    "documentation",
    "refactoring",
    "code_review",
    "security_audit",
    "performance_analysis",
    "compliance_check",
    "debugging",
    "bug_fixing",
    "troubleshooting",
    "root_cause_analysis",
    "optimization",
    "deployment",
    "configuration",
    "monitoring",
    "scaling",
)


def capability_queue(capability: str) -> str:
    return f"cap.{capability}"


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

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey("agent_sessions.Session", on_delete=models.CASCADE, related_name="tasks")
    key = models.CharField(max_length=64)
    title = models.CharField(max_length=200)
    instructions = models.TextField(blank=True)
    capability = models.CharField(max_length=40, choices=[(c, c) for c in CAPABILITIES])
    required = models.BooleanField(default=True)
    params = models.JSONField(default=dict, blank=True)
    depends_on = models.ManyToManyField("self", symmetrical=False, related_name="dependents", blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    max_attempts = models.PositiveSmallIntegerField(default=3)
    agent = models.ForeignKey("agents.Agent", null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks")
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    position = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    queued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["session", "position"]
        constraints = [models.UniqueConstraint(fields=["session", "key"], name="unique_task_key_per_session")]

    def __str__(self) -> str:
        return f"{self.key} ({self.status})"

    @property
    def queue(self) -> str:
        return capability_queue(self.capability)
