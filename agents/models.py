from datetime import timedelta

from django.conf import settings
from django.db import models
from django.db.models import Case, F, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone


class Agent(models.Model):
    """One agent worker: a Celery worker consuming cap.<capability> queues and agent.<name>."""

    class Status(models.TextChoices):
        ONLINE = "online"
        BUSY = "busy"
        DRAINING = "draining"
        OFFLINE = "offline"

    class Executor(models.TextChoices):
        SCRIPTED = "scripted"
        SHELL = "shell"

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
    # Exponentially weighted mean task duration, for routing; None until the first task.
    ewma_duration_s = models.FloatField(null=True, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    tasks_completed = models.PositiveIntegerField(default=0)
    tasks_failed = models.PositiveIntegerField(default=0)
    registered_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def queues(self) -> list[str]:
        return [f"cap.{capability}" for capability in self.capabilities] + [f"agent.{self.name}"]

    @property
    def is_live(self) -> bool:
        if self.status == self.Status.OFFLINE or self.last_heartbeat is None:
            return False
        return timezone.now() - self.last_heartbeat < timedelta(seconds=settings.AGENT_OFFLINE_AFTER_SECONDS)

    def heartbeat(self) -> None:
        # One statement, so a concurrent drain is never overwritten by a heartbeat.
        Agent.objects.filter(pk=self.pk).update(
            last_heartbeat=timezone.now(),
            status=Case(
                When(status=self.Status.DRAINING, then=Value(self.Status.DRAINING)),
                When(current_load__gte=F("concurrency"), then=Value(self.Status.BUSY)),
                default=Value(self.Status.ONLINE),
            ),
        )

    def task_finished(self, *, succeeded: bool, duration_s: float) -> None:
        counter = "tasks_completed" if succeeded else "tasks_failed"
        Agent.objects.filter(pk=self.pk).update(
            current_load=F("current_load") - 1,
            # EWMA with alpha 0.2; the first task sets it (NULL * x is NULL, so Coalesce picks it).
            ewma_duration_s=Coalesce(F("ewma_duration_s") * 0.8 + duration_s * 0.2, Value(duration_s)),
            **{counter: F(counter) + 1},
        )
