from django.contrib import admin, messages

from orchestrator_project.admin_display import ViewOnly, redacted

from . import eap, services
from .models import Agent, AgentEvent, EapDelivery


@admin.action(description="Drain: stop consuming, finish in-flight tasks")
def drain_agents(modeladmin, request, queryset):
    for agent in queryset:
        services.drain_agent(agent, actor=f"admin:{request.user.get_username()}")
    modeladmin.message_user(request, f"Draining {len(queryset)} agent(s).", messages.SUCCESS)


@admin.action(description="Resume consuming after a drain")
def resume_agents(modeladmin, request, queryset):
    for agent in queryset:
        services.resume_agent(agent, actor=f"admin:{request.user.get_username()}")
    modeladmin.message_user(request, f"Resumed {len(queryset)} agent(s).", messages.SUCCESS)


@admin.action(description="Revoke the credentials of the selected external agents (they go offline)")
def revoke_agent_credentials(modeladmin, request, queryset):
    external = [agent for agent in queryset if agent.is_external]
    for agent in external:
        eap.revoke_credentials(agent, actor=f"admin:{request.user.get_username()}")
    skipped = len(queryset) - len(external)
    note = f"; {skipped} platform worker(s) skipped (they have none)" if skipped else ""
    modeladmin.message_user(request, f"Revoked the credentials of {len(external)} agent(s){note}.", messages.SUCCESS)


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    """Agents register themselves (manage.py run_agent; an external agent through POST
    /api/v1/eap/register/, which checks its endpoint and issues its token), and their heartbeats
    keep the row up to date. The admin drains and resumes them (the actions, which also tell the
    worker) and sets the one thing nothing else sets: the routing tier."""

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
    exclude = ["token_hash", "signing_secret", "previous_token_hash", "previous_signing_secret"]
    actions = [drain_agents, resume_agents, revoke_agent_credentials]

    def has_add_permission(self, request) -> bool:
        return False

    def get_fields(self, request, obj=None) -> list[str]:
        return [f.name for f in Agent._meta.fields if not f.primary_key and f.name not in self.exclude]

    def get_readonly_fields(self, request, obj=None) -> list[str]:
        # Everything but the tier: a field added to the model later is read-only until someone
        # decides otherwise.
        return [name for name in self.get_fields(request, obj) if name != "tier"]

    def save_model(self, request, obj, form, change) -> None:
        # Only the tier, never the status, load or counters as they were read: a heartbeat or a
        # drain may have written them since.
        if form.changed_data:
            obj.save(update_fields=form.changed_data)


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

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # they go with their task (retention); a gateway may be waiting on one


@admin.register(AgentEvent)
class AgentEventAdmin(ViewOnly, admin.ModelAdmin):
    """Read-only: the audit of drains and resumes, written by agents/services.py."""

    list_display = ["created_at", "agent_name", "action", "actor", "from_status", "to_status", "redacted_reason"]
    exclude = ["reason"]
    readonly_fields = ["redacted_reason"]
    redacted_reason = redacted("reason")
    list_filter = ["action"]
    search_fields = ["agent_name", "actor", "reason"]
    date_hierarchy = "created_at"
