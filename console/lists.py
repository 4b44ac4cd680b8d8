"""The console's list pages: the sessions of the current tenant, the fleet (with drain and
resume), and the tenant switcher.

Each page costs a fixed number of queries, whatever the number of rows: the rows of the page in
one, and what each row needs (task counts, circuits) in one more for all of them.
"""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST, require_safe

from agents import eap, services
from agents.models import Agent, AgentEvent
from orchestrator_project.redaction import redact
from sessions import feed
from sessions.models import Session
from tasks import summaries
from tasks.decomposition import TEMPLATE_NAMES

from . import access

PAGE_SIZE = 25
AGES = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(days=7), "month": timedelta(days=30)}
# "Failed only": the sessions that ended with something not done.
FAILED = [
    Session.Status.FAILED,
    Session.Status.TIMEOUT,
    Session.Status.ORPHANED,
    Session.Status.PARTIALLY_COMPLETED,
]
NO_TEMPLATE = "none"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _cursor(session: Session) -> str:
    """Where a page starts or ends: the row's created_at (in microseconds) and id, the list's order."""
    return f"{(session.created_at - _EPOCH) // timedelta(microseconds=1)}-{session.pk.hex}"


def _parse_cursor(text: str) -> tuple[datetime, str]:
    micros, _, pk = text.partition("-")
    if not (micros.isascii() and micros.isdigit() and len(micros) <= 18 and len(pk) == 32):
        raise forms.ValidationError("not a page of this list; start again from the newest")
    try:
        return _EPOCH + timedelta(microseconds=int(micros)), str(uuid.UUID(hex=pk))
    except (ValueError, OverflowError):
        raise forms.ValidationError("not a page of this list; start again from the newest") from None


class SessionFilters(forms.Form):
    """The list's filters, a GET form that works without JavaScript; older/newer are the pages."""

    status = forms.MultipleChoiceField(
        choices=Session.Status.choices, required=False, widget=forms.CheckboxSelectMultiple
    )
    template = forms.ChoiceField(
        choices=[("", "any"), (NO_TEMPLATE, "none (a DAG given)"), *((t, t) for t in TEMPLATE_NAMES)],
        required=False,
    )
    age = forms.ChoiceField(
        label="Created",
        choices=[
            ("", "any time"),
            ("hour", "last hour"),
            ("day", "last day"),
            ("week", "last week"),
            ("month", "last 30 days"),
        ],
        required=False,
    )
    q = forms.CharField(
        label="Text",
        required=False,
        max_length=200,
        widget=forms.TextInput(attrs={"type": "search", "placeholder": "title or requirements"}),
    )
    failed = forms.BooleanField(
        label="Failed only", required=False, help_text="failed, timeout, orphaned, partially completed"
    )
    older = forms.CharField(required=False, widget=forms.HiddenInput)
    newer = forms.CharField(required=False, widget=forms.HiddenInput)

    def clean_older(self):
        return _parse_cursor(self.cleaned_data["older"]) if self.cleaned_data["older"] else None

    def clean_newer(self):
        return _parse_cursor(self.cleaned_data["newer"]) if self.cleaned_data["newer"] else None

    def filter(self, sessions):
        data = self.cleaned_data
        if data["status"]:
            sessions = sessions.filter(status__in=data["status"])
        if data["failed"]:
            sessions = sessions.filter(status__in=FAILED)
        if data["template"]:
            sessions = sessions.filter(template="" if data["template"] == NO_TEMPLATE else data["template"])
        if data["age"]:
            sessions = sessions.filter(created_at__gte=timezone.now() - AGES[data["age"]])
        if data["q"].strip():
            sessions = sessions.search(data["q"].strip())
        return sessions


@dataclass
class Page:
    sessions: list
    older: str | None = None  # the cursor of the next page, going back in time
    newer: str | None = None


def _page(sessions, older, newer) -> Page:
    """One page of `sessions`, newest first, after the cursor `older` or before `newer`."""
    if newer is not None:
        at, pk = newer
        after = sessions.filter(Q(created_at__gt=at) | Q(created_at=at, pk__gt=pk))
        rows = list(after.order_by("created_at", "pk")[: PAGE_SIZE + 1])
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE][::-1]
        return Page(rows, older=_cursor(rows[-1]) if rows else None, newer=_cursor(rows[0]) if more else None)
    if older is not None:
        at, pk = older
        sessions = sessions.filter(Q(created_at__lt=at) | Q(created_at=at, pk__lt=pk))
    rows = list(sessions.order_by("-created_at", "-pk")[: PAGE_SIZE + 1])
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    return Page(
        rows,
        older=_cursor(rows[-1]) if more else None,
        newer=_cursor(rows[0]) if older is not None and rows else None,
    )


def _link(request, **cursor) -> str:
    query = request.GET.copy()
    for name in ("older", "newer"):
        query.pop(name, None)
    query.update({name: value for name, value in cursor.items() if value})
    return f"?{query.urlencode()}"


@login_required
@require_safe
def sessions(request):
    current = access.current_membership(request)
    form = SessionFilters(request.GET)
    context = {"form": form, "page": None}
    if current is None:
        return render(request, "console/session_list.html", context)
    if not form.is_valid():
        # A filter that cannot be applied is said so, rather than a list that looks filtered and is not.
        return render(request, "console/session_list.html", context, status=400)
    # One snapshot for the rows, their counts and the position the live badges continue from.
    with feed.consistent_read() as position:
        base = form.filter(Session.objects.filter(tenant_id=current.tenant_id))
        page = _page(base, form.cleaned_data["older"], form.cleaned_data["newer"])
        summaries.add_task_counts(page.sessions)
    for session in page.sessions:
        counts = session._task_counts
        session.done, session.failed, session.total = counts["completed"], counts["failed"], sum(counts.values())
    context |= {
        "page": page,
        "position": position.encode(),
        "older_link": _link(request, older=page.older) if page.older else None,
        "newer_link": _link(request, newer=page.newer) if page.newer else None,
        "newest_link": _link(request) if form.cleaned_data["older"] or form.cleaned_data["newer"] else None,
    }
    return render(request, "console/session_list.html", context)


@login_required
@require_POST
def switch_tenant(request):
    tenant = access.switch(request, request.POST.get("tenant", ""))
    messages.success(request, f"Showing tenant {tenant.slug}.")
    target = request.POST.get("next", "")
    safe = url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    )
    return redirect(target if safe else reverse("console:sessions"))


# --- the fleet ------------------------------------------------------------------------------------

RECENT_ACTIONS = 10


@dataclass
class AgentRow:
    agent: Agent
    heartbeat_age: str
    circuit: str  # closed, open, half-open; "unknown" (Redis did not answer); "" (no circuit)
    may_steer: bool
    hostname: str


@dataclass
class CapabilityRow:
    capability: str
    queued: int
    oldest_age: str
    running: int
    online: int


def ago(seconds: float | None) -> str:
    """A duration as people read it: 45 s, 12 min, 3.5 h, 2 d."""
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _agent_rows(request, agents: list[Agent], roles: dict[int, str], now: datetime) -> list[AgentRow]:
    circuits = eap.circuit_states(agents)
    rows = []
    for agent in agents:
        heartbeat = (now - agent.last_heartbeat).total_seconds() if agent.last_heartbeat else None
        circuit = circuits.get(agent.pk, "")  # only a push agent has a circuit
        rows.append(
            AgentRow(
                agent=agent,
                heartbeat_age=ago(heartbeat),
                circuit="unknown" if circuit is None else circuit,
                may_steer=agent.may_be_steered_by(request.user, roles),
                hostname=agent.hostname_for(request.user),
            )
        )
    return rows


def _capability_rows(agents: list[Agent], now: datetime) -> list[CapabilityRow]:
    queues = summaries.queues()
    online: dict[str, int] = {}
    for agent in agents:
        up = agent.status in (Agent.Status.ONLINE, Agent.Status.BUSY) and agent.is_live
        for capability in agent.capabilities or []:
            online[capability] = online.get(capability, 0) + int(up)
    rows = []
    for capability in sorted(set(queues) | set(online)):
        queue = queues.get(capability, summaries.Queue())
        waited = queue.oldest_age_s(now)
        rows.append(
            CapabilityRow(
                capability, queue.queued, ago(waited) if queue.queued else "", queue.running, online.get(capability, 0)
            )
        )
    return rows


def _recent_actions(request, agents: list[Agent]) -> list[dict]:
    by_id = {agent.pk: agent for agent in agents}
    events = AgentEvent.objects.filter(agent_id__in=by_id)[:RECENT_ACTIONS]
    shown = []
    for event in events:
        # Who on the platform's staff drained a shared worker is for staff to know; a tenant's
        # own people see each other.
        private = by_id[event.agent_id].tenant_id is None and not request.user.is_staff
        shown.append(
            {"event": event, "actor": "platform staff" if private else event.actor, "reason": redact(event.reason)}
        )
    return shown


def _with_durations(tasks: list) -> list:
    for task in tasks:
        task.duration_text = ago(task.duration.total_seconds())
    return tasks


@login_required
@require_safe
def fleet(request):
    current = access.current_membership(request)
    tenant_id = current.tenant_id if current else None
    now = timezone.now()
    agents = list(Agent.objects.visible_in(tenant_id).order_by("name"))
    roles = {current.tenant_id: current.role} if current else {}
    context = {
        "agents": _agent_rows(request, agents, roles, now),
        "capabilities": _capability_rows(agents, now),
        "actions": _recent_actions(request, agents),
        "errors": summaries.top_errors(tenant_id) if tenant_id else [],
        "slowest": _with_durations(summaries.slowest_tasks(tenant_id)) if tenant_id else [],
        "now": now,
    }
    return render(request, "console/fleet.html", context)


STEERING = {"drain": services.drain_agent, "resume": services.resume_agent}


@login_required
@require_POST
def agent_action(request, pk: int, action: str):
    """Drain or resume an agent: who may is the API's rule (Agent.may_be_steered_by). Without
    confirm=yes (a browser without JavaScript, whose confirm() never ran), a page asks first."""
    service = STEERING.get(action)
    if service is None:
        raise Http404("No such action.")
    agent = get_object_or_404(Agent.objects.visible_to(request.user), pk=pk)
    if not agent.may_be_steered_by(request.user):
        raise PermissionDenied(
            "Only staff may drain or resume a platform worker, and only its tenant's operators an external agent."
        )
    reason = request.POST.get("reason", "").strip()[:500]
    if request.POST.get("confirm") != "yes":
        return render(request, "console/agent_confirm.html", {"agent": agent, "action": action, "reason": reason})
    service(agent, actor=f"user:{request.user.get_username()}", reason=reason)
    verb = {"drain": "Draining", "resume": "Resumed"}[action]
    messages.success(request, f"{verb} {agent.name}.")
    return redirect("console:fleet")
