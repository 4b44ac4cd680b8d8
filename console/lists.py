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
from django.db.models import Q
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_POST

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
            words = data["q"].strip()
            sessions = sessions.filter(Q(title__icontains=words) | Q(requirements__icontains=words))
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
@require_GET
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


def fleet(request):  # built next
    raise Http404


agent_action = fleet
