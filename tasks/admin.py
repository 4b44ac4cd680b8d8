"""The admin of tasks and of sessions. A session's page lists its tasks and its actions run the
session's lifecycle (tasks.lifecycle), which is why the Session admin lives here rather than in
sessions/admin.py."""

from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from orchestrator_project.admin_display import ViewOnly, redacted
from orchestrator_project.locking import LockUnavailable, StaleFencingToken
from sessions.models import InvalidTransition, Session, SessionEvent
from tasks.quotas import QuotaExceeded

from . import lifecycle
from .models import Task


@admin.register(Task)
class TaskAdmin(ViewOnly, admin.ModelAdmin):
    """View-only. A session's tasks are its DAG, made with it by lifecycle.create_session (keys,
    dependencies, capabilities and pinned agents checked together); the rest is the engine's
    bookkeeping (upstream_open, via_canvas, message_id, leases). An added, edited or deleted task
    would break the DAG's counts."""

    list_display = ["key", "session", "capability", "status", "required", "agent", "attempts", "finished_at"]
    list_filter = ["status", "capability", "required"]
    search_fields = ["key", "title", "session__title"]
    list_select_related = ["session", "agent"]
    # What the agent wrote, redacted.
    exclude = ["error", "result"]
    readonly_fields = ["redacted_error", "redacted_result"]
    redacted_error = redacted("error")
    redacted_result = redacted("result")


class TaskInline(ViewOnly, admin.TabularInline):
    model = Task
    fields = ["key", "title", "capability", "status", "required", "agent", "attempts", "redacted_error"]
    readonly_fields = fields
    redacted_error = redacted("error")
    extra = 0
    can_delete = False
    show_change_link = True


class SessionEventInline(ViewOnly, admin.TabularInline):
    model = SessionEvent
    fields = ["created_at", "from_status", "to_status", "redacted_reason", "actor", "version", "fencing_token"]
    readonly_fields = fields
    redacted_reason = redacted("reason")
    extra = 0
    can_delete = False


def _run_transition(modeladmin, request, queryset, service, verb: str) -> None:
    done = 0
    for session in queryset:
        try:
            service(session, actor=f"admin:{request.user.get_username()}")
            done += 1
        except (InvalidTransition, LockUnavailable, StaleFencingToken, QuotaExceeded) as exc:
            modeladmin.message_user(request, f"{session.title}: {exc}", messages.WARNING)
    if done:
        modeladmin.message_user(request, f"{verb} {done} session(s).", messages.SUCCESS)


@admin.action(description="Cancel (or stop, if running) the selected sessions")
def cancel_sessions(modeladmin, request, queryset):
    _run_transition(modeladmin, request, queryset, lifecycle.cancel_session, "Cancelled")


@admin.action(description="Retry the selected sessions: completed tasks stay, the rest run again")
def retry_sessions(modeladmin, request, queryset):
    _run_transition(modeladmin, request, queryset, lifecycle.retry_session, "Retried")


# Sessions are made by lifecycle.create_session alone (the API's POST): it checks the DAG, the
# template, the repository and the idempotency key. Until the session starts, an operator may
# adjust the parameters the engine reads only from then on; the rest is what was checked and what
# the DAG was built from. Once started, the engine owns the row.
ADJUSTABLE_WHILE_PENDING = ["title", "priority", "timeout_seconds", "max_retries", "fail_fast"]
CREATED_THROUGH_THE_API = "Sessions are created through the API (POST /api/v1/sessions/), not here."
SESSION_NOTE = (
    "Sessions are created through the API (POST /api/v1/sessions/), which checks their DAG, template, "
    "repository and idempotency key. Until a session starts, its title, priority, timeout, retries and "
    "fail-fast can be changed here; once started, the engine owns it and this page is read-only. Its status "
    "changes only through the actions (cancel, retry) or the API."
)


def _shown(names) -> list[str]:
    return ["redacted_result" if name == "result" else name for name in names]


@admin.register(Session)
class SessionAdmin(admin.ModelAdmin):
    list_display = [
        "title",
        "tenant",
        "status",
        "priority",
        "version",
        "retry_count",
        "created_at",
        "finished_at",
        "console_link",
    ]
    list_filter = ["status", "tenant", "priority"]
    search_fields = ["id", "title", "requirements"]
    date_hierarchy = "created_at"
    list_select_related = ["tenant"]
    inlines = [TaskInline, SessionEventInline]
    actions = [cancel_sessions, retry_sessions]

    @admin.display(description="console")
    def console_link(self, session: Session) -> str:
        # By name: the console's URLs, not its code (it is a layer above this one).
        page = reverse("console:session", args=[session.pk])
        return format_html('<a href="{}">open<span class="visually-hidden"> {}</span></a>', page, session.title)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        pending = obj is None or obj.status == Session.Status.PENDING
        return pending and super().has_change_permission(request, obj)

    # The result holds the workspace's diff and errors: shown redacted.
    redacted_result = redacted("result")

    def get_fieldsets(self, request, obj=None):
        return [(None, {"fields": _shown(field.name for field in Session._meta.fields), "description": SESSION_NOTE})]

    def get_readonly_fields(self, request, obj=None) -> list[str]:
        # Every field but the few adjustable ones, so that a field added to the model later is
        # read-only until someone decides otherwise.
        return _shown(field.name for field in Session._meta.fields if field.name not in ADJUSTABLE_WHILE_PENDING)

    def get_object(self, request, object_id, from_field=None):
        session = super().get_object(request, object_id, from_field)
        if session is not None and request.method == "POST":
            # The change and delete views run in one transaction: the row stays locked until the
            # edit commits, so a start cannot come between "still pending" and the write.
            session = Session.objects.select_for_update().get(pk=session.pk)
        return session

    def save_model(self, request, obj, form, change) -> None:
        # Only what the form changed (a change: there is no add), never the other columns as
        # they were read.
        if form.changed_data:
            obj.save(update_fields=[*form.changed_data, "updated_at"])

    def changelist_view(self, request, extra_context=None):
        return super().changelist_view(request, {"subtitle": CREATED_THROUGH_THE_API, **(extra_context or {})})
