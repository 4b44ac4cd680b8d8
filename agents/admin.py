from django.contrib import admin, messages

from . import services
from .models import Agent, EapDelivery


@admin.action(description="Drain: stop consuming, finish in-flight tasks")
def drain_agents(modeladmin, request, queryset):
    for agent in queryset:
        services.drain_agent(agent)
    modeladmin.message_user(request, f"Draining {len(queryset)} agent(s).", messages.SUCCESS)


@admin.action(description="Resume consuming after a drain")
def resume_agents(modeladmin, request, queryset):
    for agent in queryset:
        services.resume_agent(agent)
    modeladmin.message_user(request, f"Resumed {len(queryset)} agent(s).", messages.SUCCESS)


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "status",
        "executor",
        "mode",
        "current_load",
        "concurrency",
        "last_heartbeat",
        "tasks_completed",
    ]
    list_filter = ["status", "executor", "mode"]
    search_fields = ["name", "hostname"]
    # The token's hash and the signing secret never show: they are not on the form at all.
    exclude = ["token_hash", "signing_secret"]
    readonly_fields = [
        "mode",
        "endpoint_url",
        "token_prefix",
        "last_heartbeat",
        "registered_at",
        "current_load",
        "tasks_completed",
        "tasks_failed",
        "ewma_duration_s",
        "worker_name",
        "pid",
    ]
    actions = [drain_agents, resume_agents]


@admin.register(EapDelivery)
class EapDeliveryAdmin(admin.ModelAdmin):
    """Read-only: the gateway and the agents write deliveries, operators look at them."""

    list_display = ["task", "attempt", "agent", "state", "created_at", "finished_at"]
    list_filter = ["state"]
    list_select_related = ["task", "agent"]
    search_fields = ["task__id", "agent__name"]
    raw_id_fields = ["task", "agent"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
