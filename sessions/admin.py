"""The event log's admin: read-only. The Session admin is in tasks/admin.py (its page lists the
session's tasks and its actions run tasks.lifecycle)."""

from django.contrib import admin

from orchestrator_project.admin_display import ViewOnly, redacted

from .models import SessionEvent


@admin.register(SessionEvent)
class SessionEventAdmin(ViewOnly, admin.ModelAdmin):
    list_display = ["created_at", "session", "from_status", "to_status", "redacted_reason", "actor"]
    exclude = ["reason"]
    readonly_fields = ["redacted_reason"]
    redacted_reason = redacted("reason")
    list_filter = ["to_status"]
    list_select_related = ["session"]
