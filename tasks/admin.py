"""The admin of tasks and of sessions. A session's page lists its tasks and its actions run the
session's lifecycle (tasks.lifecycle), which is why the Session admin lives here rather than in
sessions/admin.py."""

from django.contrib import admin, messages

from orchestrator_project.locking import LockUnavailable, StaleFencingToken
from sessions.models import InvalidTransition, Session, SessionEvent

from . import lifecycle
from .models import Task


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    list_display = ["key", "session", "capability", "status", "required", "agent", "attempts", "finished_at"]
    list_filter = ["status", "capability", "required"]
    search_fields = ["key", "title", "session__title"]
    list_select_related = ["session", "agent"]
    readonly_fields = ["session", "status", "attempts", "agent", "result", "error", "started_at", "finished_at"]
    exclude = ["depends_on"]


class TaskInline(admin.TabularInline):
    model = Task
    fields = ["key", "title", "capability", "status", "required", "agent", "attempts", "error"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class SessionEventInline(admin.TabularInline):
    model = SessionEvent
    fields = ["created_at", "from_status", "to_status", "reason", "actor", "version", "fencing_token"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False


def _run_transition(modeladmin, request, queryset, service, verb: str) -> None:
    done = 0
    for session in queryset:
        try:
            service(session, actor=f"admin:{request.user.get_username()}")
            done += 1
        except (InvalidTransition, LockUnavailable, StaleFencingToken) as exc:
            modeladmin.message_user(request, f"{session.title}: {exc}", messages.WARNING)
    if done:
        modeladmin.message_user(request, f"{verb} {done} session(s).", messages.SUCCESS)


@admin.action(description="Cancel (or stop, if running) the selected sessions")
def cancel_sessions(modeladmin, request, queryset):
    _run_transition(modeladmin, request, queryset, lifecycle.cancel_session, "Cancelled")


@admin.action(description="Retry the selected sessions: completed tasks stay, the rest run again")
def retry_sessions(modeladmin, request, queryset):
    _run_transition(modeladmin, request, queryset, lifecycle.retry_session, "Retried")


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = ["title", "tenant", "status", "priority", "version", "retry_count", "created_at", "finished_at"]
    list_filter = ["status", "tenant", "priority"]
    search_fields = ["id", "title", "requirements"]
    date_hierarchy = "created_at"
    list_select_related = ["tenant"]
    readonly_fields = [
        "id",
        "status",
        "version",
        "fencing_token",
        "retry_count",
        "deadline",
        "result",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
        "idempotency_key",
    ]
    inlines = [TaskInline, SessionEventInline]
    actions = [cancel_sessions, retry_sessions]
