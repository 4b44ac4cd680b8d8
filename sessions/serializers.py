import json

from django.conf import settings
from django.db.models import Prefetch
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from agents.models import Agent
from tasks.dag import DagError, validate_dag
from tasks.decomposition import TEMPLATE_NAMES, critical_path, nodes_from_tasks
from tasks.decomposition.analyzer import HIGH, LOW, MEDIUM
from tasks.models import CAPABILITIES, Task
from tasks.services import task_counts

from .models import Checkpoint, Session, SessionEvent
from .workspaces import WorkspaceError, check_repository

KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
METADATA_MAX_BYTES = 16_384
JSON_MAX_DEPTH = 32
MAX_ESTIMATE_HOURS = 10_000


class StrictCharField(serializers.CharField):
    """A string, and only a string: DRF would otherwise turn 123 into "123"."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictRegexField(StrictCharField, serializers.RegexField):
    """A RegexField that, like StrictCharField, takes only strings."""


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid", input=data)
        return data


class StrictNumberField(serializers.FloatField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


def _check_json_string(text: str) -> None:
    # jsonb rejects U+0000, and a lone surrogate (JSON "\ud800") cannot be encoded as UTF-8.
    if "\x00" in text:
        raise serializers.ValidationError("must not contain NUL characters (\\u0000)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise serializers.ValidationError("must not contain unpaired surrogate characters") from None


def validate_json_object(value: dict) -> dict:
    """Free-form JSON (metadata, params) that PostgreSQL's jsonb can store and we can re-encode:
    valid UTF-8 text without NUL characters, bounded nesting and size."""
    validate_storable_json(value)
    if len(json.dumps(value)) > METADATA_MAX_BYTES:
        raise serializers.ValidationError(f"at most {METADATA_MAX_BYTES} bytes of JSON")
    return value


def validate_storable_json(value):
    """Any JSON value jsonb can store: valid UTF-8 text without NUL characters, bounded nesting."""
    stack = [(value, 1)]
    while stack:  # iterative: a deeply nested value must not exhaust the Python stack
        item, depth = stack.pop()
        if depth > JSON_MAX_DEPTH:
            raise serializers.ValidationError(f"nested deeper than {JSON_MAX_DEPTH} levels")
        if isinstance(item, str):
            _check_json_string(item)
        elif isinstance(item, dict):
            stack.extend((key, depth) for key in item)
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return value


class RejectUnknownFieldsMixin:
    """A misspelt field ("depends" for "depends_on") is an error, not silently dropped."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["unknown field"] for name in unknown})
        return super().to_internal_value(data)


class ScriptedParamsSerializer(serializers.Serializer):
    """The params the scripted executor reads; others pass through to other executors."""

    duration_s = StrictNumberField(min_value=0, max_value=3600, required=False)
    fail_rate = StrictNumberField(min_value=0, max_value=1, required=False)
    output = StrictCharField(max_length=10_000, required=False, allow_blank=True)
    transient_failures = StrictIntegerField(min_value=0, max_value=10, required=False)
    count_side_effect = StrictBooleanField(required=False)


SCRIPTED_PARAMS = frozenset(ScriptedParamsSerializer._declared_fields)


class EstimateSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """A PERT estimate in hours; the expected duration is (optimistic + 4 * likely + pessimistic) / 6."""

    optimistic = StrictNumberField(min_value=0, max_value=MAX_ESTIMATE_HOURS)
    likely = StrictNumberField(min_value=0, max_value=MAX_ESTIMATE_HOURS)
    pessimistic = StrictNumberField(min_value=0, max_value=MAX_ESTIMATE_HOURS)

    def validate(self, attrs):
        if attrs["likely"] < attrs["optimistic"]:
            raise serializers.ValidationError({"likely": ["must be at least optimistic"]})
        if attrs["pessimistic"] < attrs["likely"]:
            raise serializers.ValidationError({"pessimistic": ["must be at least likely"]})
        return attrs


class TaskSpecSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """One node of a client-sent DAG; `depends_on` lists keys of other tasks in the same request."""

    key = StrictRegexField(KEY_PATTERN, max_length=64)
    title = StrictCharField(max_length=200)
    capability = serializers.ChoiceField(choices=CAPABILITIES)
    depends_on = serializers.ListField(child=StrictCharField(max_length=64), default=list, max_length=500)
    required = StrictBooleanField(default=True)
    instructions = StrictCharField(allow_blank=True, default="")
    params = serializers.DictField(default=dict)
    max_attempts = StrictIntegerField(min_value=1, max_value=10, default=3)
    estimate = EstimateSerializer(required=False, help_text="PERT estimate in hours; one hour each if left out.")
    agent = serializers.RegexField(
        r"^[a-z0-9][a-z0-9_-]{0,99}$",
        required=False,
        help_text="Pin the task to this agent: it runs only there, waiting while the agent is busy.",
    )
    timeout_seconds = StrictIntegerField(
        min_value=1,
        max_value=7 * 86400,
        required=False,
        help_text="This task's deadline; default TASK_DEADLINE_SECONDS.",
    )

    def validate_instructions(self, value: str) -> str:
        if len(value) > settings.MAX_TEXT_CHARS:
            raise serializers.ValidationError(f"at most {settings.MAX_TEXT_CHARS} characters")
        return value

    def validate_timeout_seconds(self, value: int) -> int:
        # The broker's visibility timeout is derived from TASK_DEADLINE_SECONDS; a longer task
        # would be redelivered while it still runs.
        if value > settings.TASK_DEADLINE_SECONDS:
            raise serializers.ValidationError(f"at most TASK_DEADLINE_SECONDS ({settings.TASK_DEADLINE_SECONDS})")
        return value

    def validate(self, attrs):
        attrs = super().validate(attrs)
        if "agent" in attrs:
            # The agent must be registered and able to do the task; whether it is online is a
            # runtime matter (the session turns degraded).
            name = attrs["agent"]
            # Only our workers have an agent.<name> queue; external agents run behind a gateway.
            workers = Agent.objects.filter(name=name, mode=Agent.Mode.WORKER)
            capabilities = workers.values_list("capabilities", flat=True).first()
            if capabilities is None:
                raise serializers.ValidationError({"agent": [f"no agent named {name!r} is registered"]})
            if attrs["capability"] not in capabilities:
                raise serializers.ValidationError(
                    {"agent": [f"agent {name!r} does not have capability {attrs['capability']!r}"]}
                )
        return attrs

    def validate_params(self, value: dict) -> dict:
        validate_json_object(value)
        scripted = ScriptedParamsSerializer(data={k: v for k, v in value.items() if k in SCRIPTED_PARAMS})
        scripted.is_valid(raise_exception=True)
        return value


class SessionCreateSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """A new session: `tasks` is an explicit DAG; without it the requirements are decomposed by the
    named `template` or the one the analyzer infers. Unknown fields are rejected."""

    tenant = serializers.SlugField(required=False, help_text="Tenant slug; needed only if you belong to several.")
    title = StrictCharField(max_length=200, required=False, help_text="Defaults to the requirements' first line.")
    requirements = StrictCharField()
    priority = StrictIntegerField(min_value=0, max_value=9, default=5, help_text="0..9, 9 most urgent.")
    timeout_seconds = StrictIntegerField(min_value=1, max_value=7 * 86400, default=3600)
    max_retries = StrictIntegerField(min_value=0, max_value=10, default=3)
    fail_fast = StrictBooleanField(default=False, help_text="On the first failed required task, cancel the rest.")
    metadata = serializers.DictField(default=dict)
    template = serializers.ChoiceField(
        choices=TEMPLATE_NAMES,
        required=False,
        help_text="Decomposition template; inferred from the requirements if left out. Not with `tasks`.",
        error_messages={
            "invalid_choice": f'unknown template "{{input}}"; known templates: {", ".join(TEMPLATE_NAMES)}'
        },
    )
    tasks = TaskSpecSerializer(many=True, required=False)
    repository = StrictCharField(
        max_length=1000,
        required=False,
        help_text="A git repository to work on: an absolute path on the server (under REPOSITORY_ROOTS) or a git "
        "URL. The session gets a workspace of its own on a new branch.",
    )
    base_branch = StrictCharField(
        max_length=200, required=False, help_text="The branch to start from; the repository's current one if left out."
    )

    def validate_requirements(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("must not be empty")
        if len(value) > settings.MAX_TEXT_CHARS:
            raise serializers.ValidationError(f"at most {settings.MAX_TEXT_CHARS} characters")
        return value

    def validate_metadata(self, value: dict) -> dict:
        return validate_json_object(value)

    def validate_tasks(self, value: list) -> list:
        if not value:
            raise serializers.ValidationError("send at least one task, or leave tasks out")
        if len(value) > settings.MAX_TASKS_PER_SESSION:
            raise serializers.ValidationError(
                f"{len(value)} tasks exceed the maximum of {settings.MAX_TASKS_PER_SESSION} per session"
            )
        try:
            validate_dag(value)
        except DagError as exc:
            raise serializers.ValidationError({exc.path.removeprefix("tasks"): [exc.message]}) from None
        return value

    def validate(self, attrs):
        attrs = super().validate(attrs)
        if "template" in attrs and "tasks" in attrs:
            raise serializers.ValidationError(
                {"template": ["leave template out when you send tasks: an explicit DAG has no template"]}
            )
        attrs.setdefault("title", attrs["requirements"].strip().splitlines()[0][:200])
        if "base_branch" in attrs and "repository" not in attrs:
            raise serializers.ValidationError({"base_branch": ["a base branch needs a repository"]})
        if "repository" in attrs:
            try:
                check_repository(attrs["repository"], attrs.get("base_branch", ""))
            except WorkspaceError as exc:
                raise serializers.ValidationError({"repository": [str(exc)]}) from None
        return attrs


class SessionSerializer(serializers.ModelSerializer):
    tenant = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    task_counts = serializers.SerializerMethodField()
    progress = serializers.SerializerMethodField()
    allowed_transitions = serializers.SerializerMethodField()

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
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_task_counts(self, session: Session) -> dict[str, int]:
        # List views annotate n_<status> (one query per page); a single object counts here.
        if not hasattr(session, "_task_counts"):
            if hasattr(session, "n_pending"):
                session._task_counts = {s: getattr(session, f"n_{s}") for s in Task.Status.values}
            else:
                session._task_counts = task_counts(session.tasks.only("status"))
        return session._task_counts

    def get_progress(self, session: Session) -> float:
        """Share of tasks that reached a final status, 0..1."""
        counts = self.get_task_counts(session)
        total = sum(counts.values())
        return round(sum(counts[s] for s in Task.FINISHED) / total, 4) if total else 0.0

    def get_allowed_transitions(self, session: Session) -> list[str]:
        return session.allowed_targets()


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


class PlannedTaskSerializer(serializers.Serializer):
    key = serializers.CharField()
    title = serializers.CharField()
    capability = serializers.ChoiceField(choices=CAPABILITIES)
    depends_on = serializers.ListField(child=serializers.CharField())
    required = serializers.BooleanField()
    instructions = serializers.CharField()
    params = serializers.DictField()
    estimate = EstimateSerializer()
    expected_hours = serializers.FloatField(help_text="PERT mean: (optimistic + 4 * likely + pessimistic) / 6.")


class AnalysisSerializer(serializers.Serializer):
    complexity = serializers.ChoiceField(choices=[LOW, MEDIUM, HIGH])
    keywords = serializers.ListField(child=serializers.CharField(), help_text="Whole words matched, in text order.")
    concerns = serializers.ListField(child=serializers.CharField())
    # A plain string child: a second enum of the capabilities would get a second name in the schema.
    capabilities = serializers.ListField(
        child=serializers.CharField(), help_text="Capabilities the requirements call for (see Task.capability)."
    )
    template_scores = serializers.DictField(child=serializers.IntegerField())


class DecompositionPreviewSerializer(serializers.Serializer):
    """What creating a session with the same body would produce; nothing is stored."""

    template = serializers.CharField(allow_blank=True, help_text='The template used; "" for an explicit DAG.')
    analysis = AnalysisSerializer()
    tasks = PlannedTaskSerializer(many=True)
    edges = serializers.ListField(
        child=serializers.ListField(child=serializers.CharField(), min_length=2, max_length=2),
        help_text="[upstream, downstream] task keys.",
    )
    topological_order = serializers.ListField(child=serializers.CharField())
    critical_path = serializers.ListField(child=serializers.CharField(), help_text="By expected duration.")
    estimated_makespan_hours = serializers.FloatField()
