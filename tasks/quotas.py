"""Per-tenant quotas: how many sessions a tenant may have unsettled at once, how many unfinished
tasks across them, how many tasks one session may have, and the highest priority each role may
set. The limits are the tenant's (Tenant.*_limit, editable in the admin) or the settings'.

The counting quotas are checked with the tenant's row locked (lock_tenant), in the transaction
that adds the sessions or tasks: every create or retry of one tenant waits for the one before to
commit, so concurrent requests never exceed a limit together."""

from dataclasses import dataclass

from django.db.models import Q

from sessions.models import SETTLED, Session
from tenants.models import Tenant

from .models import Task

# Sessions that hold a place in the active-sessions quota: every status but the settled ones
# (pending, queued, running, degraded, paused). A pending or paused session counts because it
# may be started or resumed at any moment without another check.
UNSETTLED = frozenset(Session.Status.values) - SETTLED

ACTIVE_SESSIONS = "active_sessions"
OPEN_TASKS = "open_tasks"
TASKS_PER_SESSION = "tasks_per_session"
MAX_PRIORITY = "max_priority"


class QuotaExceeded(Exception):
    """A request needs more than a tenant's quota allows (HTTP 429 quota_exceeded). For a
    counting quota `used` is the tenant's use now and `requested` what the request adds; for
    tasks_per_session and max_priority both are what the request asks for."""

    def __init__(self, quota: str, *, limit: int, used: int, requested: int):
        self.quota, self.limit, self.used, self.requested = quota, limit, used, requested
        if quota == MAX_PRIORITY:
            text = f"priority {requested} is above the highest your role may set ({limit})"
        elif quota == TASKS_PER_SESSION:
            text = f"{requested} tasks are more than the tenant's limit of {limit} per session"
        else:
            text = f"{used} of {limit} in use, and this request needs {requested} more"
        super().__init__(f"quota {quota} exceeded: {text}")

    @property
    def details(self) -> dict[str, int | str]:
        return {"quota": self.quota, "limit": self.limit, "used": self.used, "requested": self.requested}


@dataclass(frozen=True)
class Usage:
    active_sessions: int
    open_tasks: int


def lock_tenant(tenant_id: int) -> Tenant:
    """Lock the tenant's row until the transaction ends: the quota checks of one tenant queue
    here. FOR NO KEY UPDATE, so that rows referring to the tenant (sessions, agents) can still be
    inserted by others meanwhile (their foreign key check takes FOR KEY SHARE)."""
    return Tenant.objects.select_for_update(no_key=True).get(pk=tenant_id)


def usage_of(tenant_id: int, *, excluding: Session | None = None) -> Usage:
    """The tenant's unsettled sessions and their unfinished tasks, leaving out `excluding`'s."""
    sessions = Session.objects.filter(tenant_id=tenant_id, status__in=UNSETTLED)
    tasks = Task.objects.filter(session__tenant_id=tenant_id, session__status__in=UNSETTLED, status__in=Task.UNFINISHED)
    if excluding is not None:
        sessions = sessions.exclude(pk=excluding.pk)
        tasks = tasks.filter(~Q(session_id=excluding.pk))
    return Usage(active_sessions=sessions.count(), open_tasks=tasks.count())


def check_request(tenant: Tenant, *, tasks: int, priority: int, role: str | None) -> None:
    """The quotas one request can break on its own: the tasks of one session and the priority
    the caller's role may set (`role` None: an internal caller, no priority cap)."""
    if role is not None:
        highest = tenant.max_priority_of(role)
        if highest is not None and priority > highest:
            raise QuotaExceeded(MAX_PRIORITY, limit=highest, used=priority, requested=priority)
    limit = tenant.tasks_per_session_limit()
    if tasks > limit:
        raise QuotaExceeded(TASKS_PER_SESSION, limit=limit, used=tasks, requested=tasks)


def check_usage(tenant: Tenant, *, sessions: int, tasks: int, excluding: Session | None = None) -> None:
    """Whether `sessions` more unsettled sessions with `tasks` more unfinished tasks fit the
    tenant's quotas. Call it with the tenant locked (lock_tenant) in the transaction that adds them."""
    usage = usage_of(tenant.pk, excluding=excluding)
    limit = tenant.active_sessions_limit()
    if usage.active_sessions + sessions > limit:
        raise QuotaExceeded(ACTIVE_SESSIONS, limit=limit, used=usage.active_sessions, requested=sessions)
    limit = tenant.open_tasks_limit()
    if usage.open_tasks + tasks > limit:
        raise QuotaExceeded(OPEN_TASKS, limit=limit, used=usage.open_tasks, requested=tasks)
