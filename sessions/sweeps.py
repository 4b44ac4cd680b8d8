"""Housekeeping sweeps over sessions, run by Beat on the housekeeping queue."""

from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from agents.models import Agent
from tasks.models import Task
from tasks.services import reroute_stranded_task

from .models import Session

S = Session.Status


def _stranded_reason(task: Task, live_agents: list[Agent]) -> str | None:
    """Why no live agent can take this ready task, or None if one can."""
    if task.pinned_agent:
        if any(a.name == task.pinned_agent for a in live_agents):
            return None
        return f"task {task.key} is pinned to agent {task.pinned_agent}, which is not live"
    if any(task.capability in a.capabilities for a in live_agents):
        return None
    return f"task {task.key} needs {task.capability} and no live agent has it"


def _reroute_stranded(waited: list[Task], live_agents: list[Agent]) -> int:
    """Re-send ready, unpinned tasks whose message waits on a gone agent's queue (affinity)."""
    live_queues = {f"agent.{a.name}" for a in live_agents}
    stranded = [
        t
        for t in waited
        if not t.pinned_agent and t.dispatched_to.startswith("agent.") and t.dispatched_to not in live_queues
    ]
    for task in stranded:
        reroute_stranded_task(task)
    return len(stranded)


def sweep_degraded_sessions() -> dict[str, int]:
    """running -> degraded when a ready task has had no live agent for DEGRADED_AFTER_SECONDS;
    degraded -> running once every ready task has one again. Each move writes its reason.
    On the way, a ready task stranded on a gone agent's queue by affinity is sent again."""
    live_agents = [
        a for a in Agent.objects.exclude(status__in=(Agent.Status.OFFLINE, Agent.Status.DRAINING)) if a.is_live
    ]
    stale = timezone.now() - timedelta(seconds=settings.DEGRADED_AFTER_SECONDS)
    moved = {"degraded": 0, "recovered": 0, "rerouted": 0}
    # Running sessions with a ready task might degrade; every degraded one might recover (its
    # ready tasks may all have been claimed since).
    sessions = Session.objects.filter(
        Q(status=S.RUNNING, tasks__status=Task.Status.QUEUED) | Q(status=S.DEGRADED)
    ).distinct()
    for session in sessions:
        # Read once: rerouting changes neither a task's status nor when it was queued.
        queued = list(session.tasks.filter(status=Task.Status.QUEUED))
        for task in queued:
            task.session = session
        waited = [t for t in queued if t.queued_at is not None and t.queued_at < stale]
        moved["rerouted"] += _reroute_stranded(waited, live_agents)
        if session.status == S.RUNNING:
            reasons = [r for t in waited if (r := _stranded_reason(t, live_agents))]
            if reasons and session.transition(S.DEGRADED, reason="; ".join(reasons), only_from=frozenset({S.RUNNING})):
                moved["degraded"] += 1
        elif not any(_stranded_reason(t, live_agents) for t in queued):
            reason = "every ready task has a live agent again"
            if session.transition(S.RUNNING, reason=reason, only_from=frozenset({S.DEGRADED})):
                moved["recovered"] += 1
    return moved
