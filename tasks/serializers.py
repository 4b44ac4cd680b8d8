from rest_framework import serializers

from .models import Task


class TaskSerializer(serializers.ModelSerializer):
    session = serializers.UUIDField(source="session_id", read_only=True)
    depends_on = serializers.SlugRelatedField(slug_field="key", many=True, read_only=True)
    agent = serializers.SlugRelatedField(slug_field="name", read_only=True)

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
