import re
from datetime import timedelta

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q
from django.utils import timezone

from tenants.models import Membership

from .capabilities import EAP_PINNED_QUEUE, capability_queue

# Agent names: also the Celery node name and the queue agent.<name>.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")
# The roles in an external agent's tenant that may drain and resume it.
STEERING_ROLES = frozenset({Membership.Role.ADMIN, Membership.Role.OPERATOR})


class AgentQuerySet(models.QuerySet):
    def visible_to(self, user) -> "AgentQuerySet":
        """What a user sees of the fleet (the API's list): the platform's workers, which serve
        every tenant, and the external agents of the user's tenants. Staff too: they run the
        platform's workers, not a tenant's agents."""
        return self.filter(Q(tenant__isnull=True) | Q(tenant__memberships__user=user)).distinct()

    def visible_in(self, tenant_id: int) -> "AgentQuerySet":
        """The fleet as one tenant sees it (the console's page, for a member of the tenant): the
        platform's workers and the tenant's own external agents."""
        return self.filter(Q(tenant__isnull=True) | Q(tenant_id=tenant_id))


class Agent(models.Model):
    """One agent: a Celery worker consuming cap.<capability> queues and agent.<name> (mode ""), or an
    external agent registered over the API (mode push or pull, docs/EAP.md), which has no queues:
    an EAP gateway worker (executor eap) hands it tasks."""

    class Status(models.TextChoices):
        ONLINE = "online"
        BUSY = "busy"
        DRAINING = "draining"
        OFFLINE = "offline"
        DEGRADED = "degraded"  # an external push agent whose circuit breaker is open

    class Executor(models.TextChoices):
        SCRIPTED = "scripted"
        SHELL = "shell"
        OPENCODE = "opencode", "OpenCode"
        EAP = "eap", "EAP gateway / external agent"

    class Mode(models.TextChoices):
        WORKER = "", "Celery worker"
        PUSH = "push"
        PULL = "pull"

    name = models.SlugField(max_length=100, unique=True)
    capabilities = models.JSONField(default=list)
    executor = models.CharField(max_length=16, choices=Executor.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OFFLINE, db_index=True)
    concurrency = models.PositiveSmallIntegerField(default=1)
    current_load = models.IntegerField(default=0)
    hostname = models.CharField(max_length=255, blank=True)
    # The Celery worker's node name (name@host), the destination of remote control commands.
    worker_name = models.CharField(max_length=255, blank=True)
    # Higher tiers are preferred when the score is otherwise equal (e.g. bigger machines).
    tier = models.PositiveSmallIntegerField(default=0)
    # Load, counters and the exponentially weighted mean duration of its last 20 tasks (None
    # before the first) are refreshed from its tasks with each heartbeat.
    ewma_duration_s = models.FloatField("EWMA duration (s)", null=True, blank=True)
    pid = models.PositiveIntegerField("PID", null=True, blank=True)
    # The worker's live pool processes, as of the last heartbeat: their tasks' leases are renewed.
    processes = ArrayField(models.PositiveIntegerField(), default=list, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    tasks_completed = models.PositiveIntegerField(default=0)
    tasks_failed = models.PositiveIntegerField(default=0)
    registered_at = models.DateTimeField(auto_now_add=True)
    # External agents (EAP) only. The token is shown once at registration; only its SHA-256 is
    # kept (it is random and long, so a slow hash buys nothing), found by its prefix. The signing
    # secret signs push bodies, so the server must keep it as it is.
    mode = models.CharField(max_length=8, choices=Mode.choices, default=Mode.WORKER, blank=True)
    endpoint_url = models.URLField("endpoint URL", max_length=500, blank=True)
    # An external agent belongs to the tenant whose operator registered it, and sees only that
    # tenant's tasks. Our own workers (no tenant) serve every tenant.
    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="external_agents"
    )
    token_prefix = models.CharField(max_length=16, blank=True)
    token_hash = models.CharField(max_length=64, blank=True)
    signing_secret = models.CharField(max_length=128, blank=True)
    # After POST /api/v1/eap/rotate/ the credentials replaced stay valid until
    # previous_credentials_expire_at (EAP_ROTATION_GRACE_SECONDS): the token is accepted and push
    # bodies carry a second signature, by the previous secret. An operator's revocation clears
    # every credential at once and marks when.
    previous_token_prefix = models.CharField(max_length=16, blank=True)
    previous_token_hash = models.CharField(max_length=64, blank=True)
    previous_signing_secret = models.CharField(max_length=128, blank=True)
    previous_credentials_expire_at = models.DateTimeField(null=True, blank=True)
    credentials_revoked_at = models.DateTimeField(null=True, blank=True)

    objects = AgentQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["token_prefix"], condition=~Q(token_prefix=""), name="unique_agent_token_prefix"
            )
        ]

    def __str__(self) -> str:
        return self.name

    def may_be_steered_by(self, user, roles: dict[int, str] | None = None) -> bool:
        """Whether `user` may drain or resume the agent. A platform worker serves every tenant, so
        only staff may; an external agent belongs to one tenant, whose admins and operators may.
        `roles` ({tenant id: role}) spares a query when the caller has the user's roles already."""
        if self.tenant_id is None:
            return bool(user.is_staff)
        if roles is not None:
            return roles.get(self.tenant_id) in STEERING_ROLES
        return user.memberships.filter(tenant_id=self.tenant_id, role__in=STEERING_ROLES).exists()

    def hostname_for(self, user) -> str:
        """The host the agent runs on, as `user` may see it: where the platform's workers run is
        for staff to know; a tenant's external agent, its members."""
        return self.hostname if self.tenant_id is not None or (user and user.is_staff) else ""

    @property
    def is_external(self) -> bool:
        return self.mode != self.Mode.WORKER

    def previous_signing_secret_in_grace(self, now) -> str:
        """The signing secret a rotation replaced, while its grace lasts; else ""."""
        expires = self.previous_credentials_expire_at
        return self.previous_signing_secret if expires is not None and now < expires else ""

    @property
    def queues(self) -> list[str]:
        if self.is_external:
            return []  # an EAP gateway's queues carry its tasks
        gateway = [EAP_PINNED_QUEUE] if self.executor == self.Executor.EAP else []
        return [capability_queue(capability) for capability in self.capabilities] + [f"agent.{self.name}", *gateway]

    @property
    def is_live(self) -> bool:
        if self.status == self.Status.OFFLINE or self.last_heartbeat is None:
            return False
        return timezone.now() - self.last_heartbeat < timedelta(seconds=settings.AGENT_OFFLINE_AFTER_SECONDS)

    @property
    def score(self) -> float:
        """How much routing wants this agent, 0..1.1 (docs/ROUTING.md):

            0.5 * success + 0.3 * free + 0.2 * speed + 0.1 * tier / 3
            success = (completed + 1) / (completed + failed + 1)   # a new agent starts at 1.0
            free    = 1 - current_load / concurrency
            speed   = 1 / (1 + ewma_duration_s / 60)                # 1.0 with no history yet

        The optimistic priors let a brand-new agent with a free slot score at least as well as
        any proven one, so it receives work and earns a history."""
        done = self.tasks_completed + self.tasks_failed
        success = (self.tasks_completed + 1) / (done + 1)
        free = max(0.0, 1 - self.current_load / max(1, self.concurrency))
        speed = 1.0 if self.ewma_duration_s is None else 1 / (1 + self.ewma_duration_s / 60)
        return 0.5 * success + 0.3 * free + 0.2 * speed + 0.1 * min(self.tier, 3) / 3

    def can_take(self, capability: str, pending: int = 0) -> bool:
        """A worker that is live, not draining, has the capability and a free slot (`pending`:
        slots promised to messages sent but not yet claimed)."""
        return (
            not self.is_external
            and self.is_live
            and self.status != self.Status.DRAINING
            and capability in self.capabilities
            and self.current_load + pending < self.concurrency
        )


class AgentEvent(models.Model):
    """Append-only audit of what people did to an agent: who drained or resumed it, rotated or
    revoked its credentials, when, why,
    and the status it was in (agents/services.py writes it, whichever way the action came: the
    API, the console or the admin). It outlives the agent: the name is kept with it."""

    class Action(models.TextChoices):
        DRAIN = "drain"
        RESUME = "resume"
        ROTATE = "rotate"  # an external agent replaced its token and signing secret
        REVOKE = "revoke"  # an operator revoked an external agent's credentials

    agent = models.ForeignKey(Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="events")
    agent_name = models.CharField(max_length=100)
    action = models.CharField(max_length=16, choices=Action.choices)
    # "user:<username>" (API, console) or "admin:<username>" (the admin's actions).
    actor = models.CharField(max_length=100)
    reason = models.CharField(max_length=500, blank=True)
    from_status = models.CharField(max_length=16, choices=Agent.Status.choices)
    to_status = models.CharField(max_length=16, choices=Agent.Status.choices)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.action} {self.agent_name} by {self.actor}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValueError("agent events are append-only")
        super().save(*args, **kwargs)


EWMA_SPAN = 20  # Agent.ewma_duration_s covers this many latest tasks


def ewma(values, alpha: float = 0.2) -> float | None:
    """Exponentially weighted mean of `values`, oldest first; None for none."""
    mean = None
    for value in values:
        mean = value if mean is None else (1 - alpha) * mean + alpha * value
    return mean


def latest_finishes(finished, *fields):
    """Of `finished` (an agent's tasks or deliveries), the latest within the statistics window
    (AGENT_STATS_WINDOW_TASKS finished in the last AGENT_STATS_WINDOW_HOURS), newest first, as
    tuples of `fields`: a backward scan of the (agent, finished_at) index, whatever the history."""
    since = timezone.now() - timedelta(hours=settings.AGENT_STATS_WINDOW_HOURS)
    latest = finished.filter(finished_at__gte=since).order_by("-finished_at")
    return latest.values_list(*fields)[: settings.AGENT_STATS_WINDOW_TASKS]


def recent_figures(finishes) -> dict:
    """An agent's counters and EWMA duration (Agent.score) from its latest finishes, newest
    first, each (completed, failed, started_at or None, finished_at): the EWMA covers the last
    EWMA_SPAN that have a start."""
    completed = failed = 0
    durations = []
    for ok, bad, started, finished in finishes:
        completed += ok
        failed += bad
        if started is not None and len(durations) < EWMA_SPAN:
            durations.append((finished - started).total_seconds())
    return {"tasks_completed": completed, "tasks_failed": failed, "ewma_duration_s": ewma(reversed(durations))}


class EapDelivery(models.Model):
    """One attempt of a task handed to an external agent: offered to pull agents (no agent yet),
    claimed by one agent (pushed to it, or taken with GET tasks/next), then done (its result
    came) or cancelled (deadline, abort, the agent went away, a newer attempt). The gateway
    that runs the task waits on this row."""

    class State(models.TextChoices):
        OFFERED = "offered"
        CLAIMED = "claimed"
        DONE = "done"
        CANCELLED = "cancelled"

    OPEN = frozenset({State.OFFERED, State.CLAIMED})

    # Looked up by (task, attempt), which the unique constraint indexes.
    task = models.ForeignKey("tasks.Task", on_delete=models.CASCADE, related_name="eap_deliveries", db_index=False)
    attempt = models.PositiveSmallIntegerField()
    agent = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="eap_deliveries", db_index=False
    )
    state = models.CharField(max_length=16, choices=State.choices, default=State.OFFERED)
    # What the agent reported: {"status", "output", "artifacts", "error"}; `error` says why a
    # done delivery failed or why a cancelled one was given up.
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    deadline = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "EAP delivery"
        verbose_name_plural = "EAP deliveries"
        ordering = ["created_at"]
        constraints = [models.UniqueConstraint(fields=["task", "attempt"], name="unique_eap_delivery_attempt")]
        indexes = [
            # GET tasks/next: the oldest offered delivery.
            models.Index(fields=["created_at"], condition=Q(state="offered"), name="eap_delivery_offered"),
            # An agent's open deliveries and recent history (its heartbeat's counters).
            models.Index(fields=["agent", "finished_at"], name="eap_delivery_agent_finished"),
        ]

    def __str__(self) -> str:
        return f"{self.task_id} attempt {self.attempt} ({self.state})"
