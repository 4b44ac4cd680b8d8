from django.contrib import admin, messages

from . import services
from .models import Agent


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
    list_display = ["name", "status", "executor", "current_load", "concurrency", "last_heartbeat", "tasks_completed"]
    list_filter = ["status", "executor"]
    search_fields = ["name", "hostname"]
    readonly_fields = [
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
