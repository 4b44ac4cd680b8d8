"""What the API answers: sessions (with task counts, progress and, in detail, the critical
path), their tasks, events and checkpoints, and agents."""

from django.db.models import Prefetch
from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from agents.models import Agent
from sessions.models import Checkpoint, Session, SessionEvent
from tasks.decomposition import critical_path, nodes_from_tasks
from tasks.lifecycle import task_counts
from tasks.models import Task


class SessionSerializer(serializers.ModelSerializer):
    tenant = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    task_counts = serializers.SerializerMethodField()
    progress = serializers.SerializerMethodField()
    allowed_transitions = serializers.SerializerMethodField()
    console_url = serializers.SerializerMethodField(help_text="The session's page in the web console.")

    class Meta:
        model = Session
        fields = [
            "id",
            "tenant",
            "title",
            "requirements",
            "status",
            "version",
            "priority",
            "timeout_seconds",
            "deadline",
            "max_retries",
            "fail_fast",
            "retry_count",
            "metadata",
            "template",
            "repository",
            "base_branch",
            "workspace_branch",
            "result",
            "task_counts",
            "progress",
            "allowed_transitions",
            "console_url",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_task_counts(self, session: Session) -> dict[str, int]:
        # A list page has them already (tasks.summaries.add_task_counts); a single object counts here.
        if not hasattr(session, "_task_counts"):
            session._task_counts = task_counts(session.tasks.only("status"))
        return session._task_counts

    def get_progress(self, session: Session) -> float:
        """Share of tasks that reached a final status, 0..1."""
        counts = self.get_task_counts(session)
        total = sum(counts.values())
        return round(sum(counts[s] for s in Task.FINISHED) / total, 4) if total else 0.0

    def get_allowed_transitions(self, session: Session) -> list[str]:
        return session.allowed_targets()

    @extend_schema_field(OpenApiTypes.URI)
    def get_console_url(self, session: Session) -> str:
        # By name: the console is a sibling of the API, not imported by it.
        path = reverse("console:session", args=[session.pk])
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path


class SessionDetailSerializer(SessionSerializer):
    """One session, with its critical path by expected duration (the list leaves it out: it needs
    the session's tasks and edges)."""

    critical_path = serializers.SerializerMethodField(help_text="Task keys, upstream first.")
    estimated_makespan_hours = serializers.SerializerMethodField(
        help_text="Total expected duration along the critical path: the makespan with enough agents."
    )

    class Meta(SessionSerializer.Meta):
        fields = [*SessionSerializer.Meta.fields, "critical_path", "estimated_makespan_hours"]
        read_only_fields = fields

    def _critical_path(self, session: Session):
        if not hasattr(session, "_critical_path"):
            estimates = ("estimate_optimistic_h", "estimate_likely_h", "estimate_pessimistic_h")
            tasks = session.tasks.only("key", *estimates).prefetch_related(
                Prefetch("depends_on", queryset=Task.objects.only("key"))
            )
            session._critical_path = critical_path(nodes_from_tasks(tasks))
        return session._critical_path

    def get_critical_path(self, session: Session) -> list[str]:
        return self._critical_path(session).keys

    def get_estimated_makespan_hours(self, session: Session) -> float:
        return round(self._critical_path(session).hours, 2)


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = SessionEvent
        fields = ["id", "from_status", "to_status", "reason", "actor", "version", "created_at"]
        read_only_fields = fields


class CheckpointSerializer(serializers.ModelSerializer):
    """Needs context["completed_keys"], from Checkpoint.completed_keys for the same rows."""

    task = serializers.SlugRelatedField(slug_field="key", read_only=True)
    completed_task_keys = serializers.SerializerMethodField()

    class Meta:
        model = Checkpoint
        fields = ["id", "task", "completed_task_keys", "created_at"]
        read_only_fields = fields

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_completed_task_keys(self, checkpoint: Checkpoint) -> list[str]:
        return self.context["completed_keys"][checkpoint.pk]


class TaskSerializer(serializers.ModelSerializer):
    session = serializers.UUIDField(source="session_id", read_only=True)
    depends_on = serializers.SlugRelatedField(slug_field="key", many=True, read_only=True)
    agent = serializers.SlugRelatedField(slug_field="name", read_only=True, allow_null=True)  # null until claimed

    class Meta:
        model = Task
        fields = [
            "id",
            "session",
            "key",
            "title",
            "status",
            "capability",
            "required",
            "depends_on",
            "instructions",
            "params",
            "agent",
            "pinned_agent",
            "timeout_seconds",
            "estimate_optimistic_h",
            "estimate_likely_h",
            "estimate_pessimistic_h",
            "attempts",
            "max_attempts",
            "result",
            "error",
            "created_at",
            "queued_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class AgentSerializer(serializers.ModelSerializer):
    queues = serializers.ListField(child=serializers.CharField(), read_only=True)
    is_live = serializers.BooleanField(read_only=True)

    class Meta:
        model = Agent
        fields = [
            "id",
            "name",
            "status",
            "is_live",
            "capabilities",
            "queues",
            "executor",
            "mode",
            "concurrency",
            "tier",
            "ewma_duration_s",
            "current_load",
            "hostname",
            "last_heartbeat",
            "tasks_completed",
            "tasks_failed",
            "registered_at",
        ]
        read_only_fields = fields

    def to_representation(self, agent):
        data = super().to_representation(agent)
        request = self.context.get("request")
        data["hostname"] = agent.hostname_for(request.user if request else None)
        return data
