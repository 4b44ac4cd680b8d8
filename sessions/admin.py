"""The event log's admin: read-only. The Session admin is in tasks/admin.py (its page lists the
session's tasks and its actions run tasks.lifecycle)."""

from django.contrib import admin

from .models import SessionEvent


@admin.register(SessionEvent)
class SessionEventAdmin(admin.ModelAdmin):
    list_display = ["created_at", "session", "from_status", "to_status", "reason", "actor"]
    list_filter = ["to_status"]
    list_select_related = ["session"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
