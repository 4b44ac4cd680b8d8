from django.contrib import admin

from .models import Task


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ["key", "session", "capability", "status", "required", "agent", "attempts", "finished_at"]
    list_filter = ["status", "capability", "required"]
    search_fields = ["key", "title", "session__title"]
    list_select_related = ["session", "agent"]
    readonly_fields = ["session", "status", "attempts", "agent", "result", "error", "started_at", "finished_at"]
    exclude = ["depends_on"]
