from django.contrib import admin

from .models import Agent


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ["name", "status", "executor", "current_load", "concurrency", "last_heartbeat", "tasks_completed"]
    list_filter = ["status", "executor"]
    search_fields = ["name", "hostname"]
    readonly_fields = ["last_heartbeat", "registered_at", "current_load", "tasks_completed", "tasks_failed", "pid"]
