"""What the API accepts to create or preview a session: its shape, checked without I/O. The
checks that need the database or git (pinned agents, the repository) are the service's
(tasks.lifecycle.check_new_session)."""

from django.conf import settings
from rest_framework import serializers

from agents.capabilities import CAPABILITIES
from agents.models import NAME_PATTERN
from orchestrator_project.validation import (
    CappedListField,
    JSONObjectField,
    RejectUnknownFieldsMixin,
    StrictBooleanField,
    StrictCharField,
    StrictIntegerField,
    StrictNumberField,
    StrictRegexField,
)
from sessions.models import MAX_PRIORITY, MAX_RETRIES, MAX_TIMEOUT_SECONDS
from tasks.dag import DagError, validate_dag
from tasks.decomposition import TEMPLATE_NAMES

KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_ESTIMATE_HOURS = 10_000
MAX_DEPENDENCIES = 500


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


class TaskListSerializer(serializers.ListSerializer):
    """The `tasks` list: its length is checked against MAX_TASKS_PER_SESSION before any task in it
    is validated, so that a body of 21,000 tiny tasks costs one len(), not 21,000 validations."""

    def to_internal_value(self, data):
        if isinstance(data, list):
            if not data:
                raise serializers.ValidationError("send at least one task, or leave tasks out")
            if len(data) > settings.MAX_TASKS_PER_SESSION:
                raise serializers.ValidationError(
                    f"{len(data)} tasks exceed the maximum of {settings.MAX_TASKS_PER_SESSION} per session"
                )
        return super().to_internal_value(data)


class TaskSpecSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """One node of a client-sent DAG; `depends_on` lists keys of other tasks in the same request."""

    class Meta:
        list_serializer_class = TaskListSerializer

    key = StrictRegexField(KEY_PATTERN, max_length=64)
    title = StrictCharField(max_length=200)
    capability = serializers.ChoiceField(choices=CAPABILITIES)
    depends_on = CappedListField(child=StrictCharField(max_length=64), default=list, max_length=MAX_DEPENDENCIES)
    required = StrictBooleanField(default=True)
    instructions = StrictCharField(allow_blank=True, default="")
    params = JSONObjectField(default=dict)
    max_attempts = StrictIntegerField(min_value=1, max_value=10, default=3)
    estimate = EstimateSerializer(required=False, help_text="PERT estimate in hours; one hour each if left out.")
    agent = serializers.RegexField(
        NAME_PATTERN.pattern,
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

    def validate_params(self, value: dict) -> dict:
        scripted = ScriptedParamsSerializer(data={k: v for k, v in value.items() if k in SCRIPTED_PARAMS})
        scripted.is_valid(raise_exception=True)
        return value


class SessionCreateSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    """A new session: `tasks` is an explicit DAG; without it the requirements are decomposed by the
    named `template` or the one the analyzer infers. Unknown fields are rejected."""

    tenant = serializers.SlugField(required=False, help_text="Tenant slug; needed only if you belong to several.")
    title = StrictCharField(max_length=200, required=False, help_text="Defaults to the requirements' first line.")
    requirements = StrictCharField()
    priority = StrictIntegerField(min_value=0, max_value=MAX_PRIORITY, default=5, help_text="0..9, 9 most urgent.")
    timeout_seconds = StrictIntegerField(min_value=1, max_value=MAX_TIMEOUT_SECONDS, default=3600)
    max_retries = StrictIntegerField(min_value=0, max_value=MAX_RETRIES, default=3)
    fail_fast = StrictBooleanField(default=False, help_text="On the first failed required task, cancel the rest.")
    metadata = JSONObjectField(default=dict)
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
        help_text="A git repository to work on: an absolute path on the server (its real path under "
        "REPOSITORY_ROOTS) or an https://, http://, ssh:// or git:// URL under REPOSITORY_URL_PREFIXES, with no "
        "user or credentials in it; stored in its normalised form. The session gets a clone of its own on a new "
        "branch.",
    )
    base_branch = StrictCharField(
        max_length=200,
        required=False,
        help_text="The branch to start from (a name `git check-ref-format --branch` takes); the repository's "
        "current one if left out.",
    )

    def validate_requirements(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("must not be empty")
        if len(value) > settings.MAX_TEXT_CHARS:
            raise serializers.ValidationError(f"at most {settings.MAX_TEXT_CHARS} characters")
        return value

    def validate_tasks(self, value: list) -> list:
        # The count was checked before the items (TaskListSerializer).
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
        return attrs
