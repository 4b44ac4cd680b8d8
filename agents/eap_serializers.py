"""The bodies of the External Agent Protocol (docs/EAP.md): what external agents send and get.
The API (api/eap.py) validates requests with them, and the eap executor a push agent's reply."""

from django.core.validators import URLValidator
from rest_framework import serializers

from orchestrator_project.validation import (
    CappedListField,
    RejectUnknownFieldsMixin,
    StrictCharField,
    StrictIntegerField,
    StrictRegexField,
    validate_storable_json,
)

from .capabilities import CAPABILITIES
from .endpoints import EndpointRefused, check_url
from .models import NAME_PATTERN

MAX_OUTPUT_CHARS = 500_000


class RegisterSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    name = StrictRegexField(
        NAME_PATTERN.pattern, max_length=100, help_text="Unique among all agents: a-z, 0-9, '-' and '_'."
    )
    capabilities = serializers.ListField(
        child=serializers.ChoiceField(choices=CAPABILITIES), allow_empty=False, max_length=len(CAPABILITIES)
    )
    tenant = serializers.SlugField(
        required=False, help_text="The tenant whose tasks it runs; needed only if you operate several."
    )
    mode = serializers.ChoiceField(
        choices=["push", "pull"], help_text="push: we POST tasks to endpoint_url; pull: the agent polls tasks/next."
    )
    endpoint_url = serializers.CharField(
        required=False,
        max_length=500,
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="push only (required there): tasks go to POST {endpoint_url}/task. https (http only in "
        "development); its host must resolve to public addresses only (EAP_ENDPOINT_ALLOW_NETWORKS adds "
        "trusted ones), checked again at every push.",
    )

    def validate_endpoint_url(self, url: str) -> str:
        try:
            return check_url(url)
        except EndpointRefused as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate(self, attrs):
        if attrs["mode"] == "push" and not attrs.get("endpoint_url"):
            raise serializers.ValidationError({"endpoint_url": ["required for a push agent"]})
        if attrs["mode"] == "pull" and "endpoint_url" in attrs:
            raise serializers.ValidationError({"endpoint_url": ["a pull agent has no endpoint; leave it out"]})
        return attrs


class RegistrationSerializer(serializers.Serializer):
    agent_id = serializers.IntegerField()
    token = serializers.CharField(help_text="Send as X-Agent-Token. Shown only now: only its hash is stored.")
    heartbeat_interval_s = serializers.IntegerField(help_text="Beat (POST heartbeat/) at least this often.")
    signing_secret = serializers.CharField(
        help_text="Push agents verify X-EAP-Signature with it. Shown only now; keep it secret."
    )


class RotationSerializer(serializers.Serializer):
    token = serializers.CharField(help_text="The new X-Agent-Token. Shown only now: only its hash is stored.")
    signing_secret = serializers.CharField(help_text="The new signing secret. Shown only now; keep it secret.")
    grace_seconds = serializers.IntegerField(
        help_text="How long the previous token and signing secret stay valid (EAP_ROTATION_GRACE_SECONDS)."
    )


class HeartbeatSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    status = serializers.ChoiceField(choices=["online", "busy", "draining"])
    current_load = StrictIntegerField(min_value=0, max_value=100_000, help_text="Tasks the agent runs now.")


class TaskOfferSerializer(serializers.Serializer):
    """A task as an external agent receives it: the push body, and GET tasks/next's answer."""

    delivery_id = serializers.IntegerField(
        help_text="Names this hand-over of the task. Signed with the rest of a push's body: remember the ones you "
        "took and refuse a push whose delivery_id you have seen (a replay)."
    )
    task_id = serializers.UUIDField()
    session_id = serializers.UUIDField()
    capability = serializers.ChoiceField(choices=CAPABILITIES)
    title = serializers.CharField()
    instructions = serializers.CharField()
    params = serializers.DictField()
    deadline = serializers.DateTimeField(help_text="Report before this; the task fails afterwards.")
    attempt = serializers.IntegerField(help_text="1 for the first attempt; (task_id, attempt) names a delivery.")


def offer_of(delivery) -> dict:
    task = delivery.task
    return {
        "delivery_id": delivery.pk,
        "task_id": task.pk,
        "session_id": task.session_id,
        "capability": task.capability,
        "title": task.title,
        "instructions": task.instructions,
        "params": task.params,
        "deadline": delivery.deadline,
        "attempt": delivery.attempt,
    }


class ResultSerializer(RejectUnknownFieldsMixin, serializers.Serializer):
    status = serializers.ChoiceField(choices=["completed", "failed"])
    output = StrictCharField(allow_blank=True, trim_whitespace=False, max_length=MAX_OUTPUT_CHARS)
    artifacts = CappedListField(
        child=serializers.DictField(), default=list, max_length=100, help_text="JSON objects, e.g. {path, content}."
    )
    error = StrictCharField(
        default="", allow_blank=True, trim_whitespace=False, max_length=5000, help_text="Why it failed."
    )

    def validate_output(self, value: str) -> str:
        return validate_storable_json(value)

    def validate_error(self, value: str) -> str:
        return validate_storable_json(value)

    def validate_artifacts(self, value: list) -> list:
        return validate_storable_json(value)


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    details = serializers.DictField()


class EapErrorSerializer(serializers.Serializer):
    """Every error: {"error": {"code", "message", "details"}}."""

    error = ErrorDetailSerializer()
