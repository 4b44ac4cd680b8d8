from rest_framework import serializers

from .models import Agent


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
