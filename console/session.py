"""The console's session page: the DAG, the task panel, the timeline and the actions.

The page is rendered from one snapshot of the database (sessions.feed.consistent_read) and hands
its position to session.js, whose event stream continues exactly after what was rendered. Every
output, error, diff and event reason passes through the one redaction function before it reaches
the template (which escapes it as well). Viewers read; the other roles may pause, resume, cancel
and retry, which writes a SessionEvent with actor "user:<username>": the audit record, shown in
the timeline.
"""

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST, require_safe

from orchestrator_project.locking import LockUnavailable, StaleFencingToken
from orchestrator_project.redaction import redact, redact_data
from sessions import feed
from sessions.models import RETRYABLE, SETTLED, TERMINAL, TRANSITIONS, FeedEvent, InvalidTransition, Session
from tasks import lifecycle
from tasks.decomposition import critical_path
from tasks.decomposition.critical_path import Node
from tasks.models import Task
from tenants.models import Membership

from . import access, graph

ACTIONS = {
    "pause": lifecycle.pause_session,
    "resume": lifecycle.resume_session,
    "cancel": lifecycle.cancel_session,
    "retry": lifecycle.retry_session,
}
# What each action does, in the confirmation (dialog and page alike).
CONSEQUENCES = {
    "pause": "Running tasks finish; no new task starts until the session is resumed.",
    "resume": "Tasks start again where the session was paused.",
    "cancel": "Tasks that have not started will not run and running ones are told to stop. A running session "
    "becomes stopped (it can be retried); a pending or paused one becomes cancelled, for good.",
    "retry": "Completed tasks keep their results; every other task runs again.",
}
# Why an action is refused, in plain words, when the session is not in a final status.
ONLY_FROM = {
    "pause": "only a queued or running session can be paused",
    "resume": "only a paused session can be resumed",
    "cancel": "it has stopped already; retry it to run it again",
    "retry": "only a failed, timed-out, stopped or orphaned session can be retried",
}
# Shown with the status text, never instead of it.
ICONS = {
    "pending": "\u25cb",
    "queued": "\u25d4",
    "running": "\u25b6",
    "degraded": "\u26a0",
    "paused": "\u23f8",
    "completed": "\u2713",
    "partially_completed": "\u25d1",
    "failed": "\u2717",
    "timeout": "\u231b",
    "stopped": "\u25a0",
    "cancelled": "\u2298",
    "orphaned": "?",
    "skipped": "\u21b7",
}
VIEWS = {"all": "All tasks", "hide-completed": "Hide completed", "failed": "Failed only"}
NO_TASK = "00000000-0000-0000-0000-000000000000"


def label(status: str) -> str:
    return status.replace("_", " ")


def actions_allowed(status: str, *, retries_left: bool = True) -> list[str]:
    """The actions the state machine accepts from `status` (sessions.models.TRANSITIONS, as
    tasks.lifecycle uses them)."""
    targets = TRANSITIONS[status]
    allowed = {
        "pause": Session.Status.PAUSED in targets,
        "resume": status == Session.Status.PAUSED,
        "cancel": lifecycle.cancel_target(status) in targets,
        "retry": status in RETRYABLE and retries_left,
    }
    return [action for action in ACTIONS if allowed[action]]


def _allowed_for(session: Session) -> list[str]:
    return actions_allowed(session.status, retries_left=session.retries_left)


# --- the timeline -------------------------------------------------------------------------------


@dataclass
class Row:
    """One event of the timeline, redacted (session.js builds the same from a stream message)."""

    id: int
    kind: str
    at: datetime
    task: str
    subject: str
    change: str
    details: list[str] = field(default_factory=list)
    error: str = ""


def row(event: FeedEvent) -> Row:
    data = redact_data(event.data)
    before, after = label(data.get("from") or ""), label(data.get("to") or "")
    if event.kind == FeedEvent.Kind.TASK:
        details = [f"attempt {data['attempt']}"] if data.get("attempt") else []
        details += [f"agent {data['agent']}"] if data.get("agent") else []
        subject, change = f"task {data.get('key', '')}", f"{before} \u2192 {after}"
        return Row(event.pk, event.kind, event.created_at, str(event.task_id), subject, change, details,
                   (data.get("error") or "")[: feed.ERROR_SHOWN])  # fmt: skip
    if not before:
        change, details = f"created ({after})", []
    else:
        change = f"note ({after})" if before == after else f"{before} \u2192 {after}"
        details = [data.get("reason") or ""]
    details += [f"by {data['actor']}"] if data.get("actor") else []
    return Row(event.pk, event.kind, event.created_at, "", "session", change, [d for d in details if d])


# --- the page -----------------------------------------------------------------------------------


def _session_of(user, pk) -> tuple[Session, Membership]:
    session = Session.objects.select_related("tenant").filter(pk=pk).first()
    if session is None:
        raise Http404("No such session.")
    return session, access.membership_or_404(user, session.tenant_id)


def _tasks_and_edges(session_id) -> tuple[list[Task], dict[str, list[str]]]:
    estimates = ("estimate_optimistic_h", "estimate_likely_h", "estimate_pessimistic_h")
    tasks = list(Task.objects.filter(session_id=session_id).only("id", "key", "status", "position", *estimates))
    upstreams: dict[str, list[str]] = {}
    edges = Task.depends_on.through.objects.filter(from_task__session_id=session_id)
    for down, up in edges.values_list("from_task_id", "to_task_id").order_by("id"):
        upstreams.setdefault(str(down), []).append(str(up))
    return tasks, upstreams


def _critical_keys(tasks: list[Task], upstreams: dict[str, list[str]]) -> list[str]:
    key_of = {str(t.pk): t.key for t in tasks}
    nodes = [Node(t.key, tuple(key_of[u] for u in upstreams.get(str(t.pk), [])), t.expected_hours) for t in tasks]
    return critical_path(nodes).keys


def _progress(tasks: list[Task]) -> dict:
    counts = lifecycle.task_counts(tasks)
    finished = sum(counts[status] for status in Task.FINISHED)
    total = len(tasks)
    return {
        "counts": [(status, counts[status]) for status in Task.Status.values],
        "finished": finished,
        "total": total,
    }


@require_safe
@login_required
def detail(request, pk):
    view = request.GET.get("view", "all")
    view = view if view in VIEWS else "all"
    with feed.consistent_read() as position:
        session, membership = _session_of(request.user, pk)
        tasks, upstreams = _tasks_and_edges(session.pk)
        # Newest first: the top of the timeline is what just happened, whatever its height.
        events = [row(event) for event in FeedEvent.objects.filter(session_id=session.pk).order_by("-id")]
        panel = _panel_context(session, request.GET["task"]) if request.GET.get("task") else None
    critical = _critical_keys(tasks, upstreams)
    selected = str(panel["task"].pk) if panel else ""
    allowed = _allowed_for(session)
    context = {
        "session": session,
        "membership": membership,
        "can_mutate": membership.can_mutate,
        "graph": graph.layout(tasks, upstreams, critical),
        "node_size": {"width": graph.NODE_WIDTH, "height": graph.NODE_HEIGHT},
        "critical_path": critical,
        "progress": _progress(tasks),
        "legend": Task.Status.values,
        "events": events,
        "after": position.encode(),
        "panel": panel,
        "selected_id": selected,
        "allowed": allowed,
        "actions": [(name, CONSEQUENCES[name], name in allowed) for name in ACTIONS],
        "workspace": _workspace(session),
        "live_config": _live_config(session, position),
        **_links(session, view, selected),
    }
    return render(request, "console/session.html", context)


def _links(session: Session, view: str, selected: str) -> dict:
    """The page's own links: the filters (keeping the open task), the nodes' (keeping the
    filter), the panel's close link."""
    base = session.get_absolute_url()
    return {
        "view": view,
        "views": [(name, text, base + _query(name, selected)) for name, text in VIEWS.items()],
        "node_query": "?" + (f"view={view}&" if view != "all" else "") + "task=",
        "close_url": base + _query(view, None),
    }


def _live_config(session: Session, position: feed.Position) -> dict:
    """What session.js needs: where its stream starts, and the rules it applies to events."""
    return {
        "session": str(session.pk),
        "after": position.encode(),
        "icons": ICONS,
        "allowed": {status: actions_allowed(status) for status in TRANSITIONS},
        "retries_left": session.max_retries - session.retry_count,
        "retryable": sorted(RETRYABLE),
        "settled": sorted(SETTLED),
        "finished": sorted(Task.FINISHED),
        "task_url": reverse("console:task", args=[session.pk, NO_TASK]),
        "no_task": NO_TASK,
    }


def _query(view: str, task: str | None) -> str:
    parts = ([f"view={view}"] if view != "all" else []) + ([f"task={task}"] if task else [])
    return "?" + "&".join(parts) if parts else ""


def _workspace(session: Session) -> dict | None:
    """The session's git result (sessions.workspaces.finish_workspace), redacted."""
    workspace = (session.result or {}).get("workspace")
    return redact_data(workspace) if isinstance(workspace, dict) else None


# --- the task panel -----------------------------------------------------------------------------


def _panel_context(session: Session, task_id: str) -> dict:
    try:
        task_id = uuid.UUID(task_id)
    except ValueError:
        raise Http404("No such task in this session.") from None
    task = Task.objects.select_related("agent").filter(pk=task_id, session_id=session.pk).first()
    if task is None:
        raise Http404("No such task in this session.")
    result = redact_data(task.result or {})
    output = result.pop("output", "")
    diff = result.pop("diff", None)
    return {
        "task": task,
        "attempts": _attempts(session, task),
        "error": redact(task.error),
        "output": output if isinstance(output, str) else json.dumps(output, indent=2, ensure_ascii=False),
        "diff_files": diff if isinstance(diff, list) else [],
        "diff_text": diff if isinstance(diff, str) else "",
        "rest": json.dumps(result, indent=2, ensure_ascii=False, sort_keys=True) if result else "",
        "duration": _duration(task.started_at, task.finished_at),
    }


@dataclass
class Attempt:
    number: int
    agent: str
    started: datetime
    ended: datetime | None = None
    outcome: str = ""  # the status it ended in ("" while it runs)
    error: str = ""

    @property
    def duration(self) -> str:
        return _duration(self.started, self.ended)


def _attempts(session: Session, task: Task) -> list[Attempt]:
    """The task's attempts, from its changes in the feed: each claim (-> running) starts one,
    the next change ends it (completed, failed, cancelled, or queued again for a retry)."""
    attempts: list[Attempt] = []
    for event in FeedEvent.objects.filter(session_id=session.pk, task_id=task.pk).order_by("id"):
        data = redact_data(event.data)
        if data.get("to") == Task.Status.RUNNING:
            attempts.append(
                Attempt(data.get("attempt") or len(attempts) + 1, data.get("agent") or "", event.created_at)
            )
        elif attempts and not attempts[-1].outcome:
            error = (data.get("error") or "")[: feed.ERROR_SHOWN]
            attempts[-1].ended, attempts[-1].outcome, attempts[-1].error = event.created_at, data.get("to", ""), error
    return attempts


def _duration(start, end) -> str:
    if start is None or end is None:
        return ""
    seconds = max((end - start) / timedelta(seconds=1), 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@require_safe
@login_required
def task_panel(request, pk, task):
    """The side panel of one task, as a fragment (session.js swaps it into the page)."""
    session, _ = _session_of(request.user, pk)
    context = {"panel": _panel_context(session, str(task)), "close_url": session.get_absolute_url()}
    return render(request, "console/task_panel.html", context)


# --- the actions --------------------------------------------------------------------------------


@require_POST
@login_required
def action(request, pk, action):
    """pause, resume, cancel or retry, for the roles that may change a session; then back to
    the page (post/redirect/get). Without confirm=yes (session.js sets it once the reader
    confirmed), a page that asks first."""
    if action not in ACTIONS:
        raise Http404("No such action.")
    session, membership = _session_of(request.user, pk)
    if not membership.can_mutate:
        raise PermissionDenied("A viewer cannot change a session.")
    if request.POST.get("confirm") != "yes":
        context = {"session": session, "action": action, "consequence": CONSEQUENCES[action]}
        return render(request, "console/session_confirm.html", context)
    actor = f"user:{request.user.get_username()}"
    try:
        ACTIONS[action](session, actor=actor)
    except InvalidTransition:
        session.refresh_from_db()
        messages.error(request, cannot(action, session))
    except (LockUnavailable, StaleFencingToken):
        messages.error(request, f"Cannot {action} now: another change of the session is under way. Try again.")
    else:
        session.refresh_from_db()
        messages.success(request, f"Done: {action} by {actor}. The session is now {label(session.status)}.")
    return redirect(session)


def cannot(action: str, session: Session) -> str:
    """An illegal move in plain words: what the session is, why not, and what is allowed."""
    if session.status in TERMINAL:
        why = "nothing can change it now"
    elif action == "retry" and session.status in RETRYABLE and session.retry_count >= session.max_retries:
        why = f"it was retried {session.retry_count} times, its limit"
    else:
        why = ONLY_FROM[action]
    allowed = _allowed_for(session)
    now = f" Allowed now: {', '.join(allowed)}." if allowed else ""
    return f"Cannot {action}: the session is {label(session.status)}; {why}.{now}"
