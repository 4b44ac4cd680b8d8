from django.contrib import admin, messages

from tasks.models import Task

from . import services
from .locking import LockUnavailable, StaleFencingToken
from .models import InvalidTransition, Session, SessionEvent


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
    _run_transition(modeladmin, request, queryset, services.cancel_session, "Cancelled")


@admin.action(description="Retry the selected sessions from their last checkpoint")
def retry_sessions(modeladmin, request, queryset):
    _run_transition(modeladmin, request, queryset, services.retry_session, "Retried")


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
