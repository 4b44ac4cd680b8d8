"""Housekeeping sweeps over sessions, run by Beat on the housekeeping queue.

Each repair is a compare-and-set or a guarded transition, so a second Beat or a sweep that runs
twice repairs nothing twice; each writes a SessionEvent saying why (docs/CONCURRENCY.md).
"""

import logging
from collections import defaultdict
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from agents.eap import external_capabilities
from agents.models import Agent
from sessions.models import ACTIVE, SETTLED, Session
from sessions.workspaces import discard_session_files

from . import fairshare
from .broker import busy_queues, lost_message_ids
from .lifecycle import mark_session_running, settle_session
from .models import Task
from .release import release_held, release_tasks, resend_queued_task, send_released, stop_open_tasks

logger = logging.getLogger(__name__)


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
    rerouted = 0
    for task in stranded:
        gone = task.dispatched_to.removeprefix("agent.")
        if resend_queued_task(task, dispatched_to=""):  # only tasks sent there by affinity: pins wait
            rerouted += 1
            why = f"task {task.key} waited on the queue of agent {gone}, which is gone; sent again"
            task.session.note(why, actor="beat")
    return rerouted


def sweep_degraded_sessions() -> dict[str, int]:
    """running -> degraded when a ready task has had no live agent for DEGRADED_AFTER_SECONDS;
    degraded -> running once every ready task has one again. Each move writes its reason.
    On the way, a ready task stranded on a gone agent's queue by affinity is sent again."""
    workers = Agent.objects.filter(mode=Agent.Mode.WORKER)  # external agents have no queues
    live_agents = [a for a in workers.exclude(status__in=(Agent.Status.OFFLINE, Agent.Status.DRAINING)) if a.is_live]
    if any(a.executor == Agent.Executor.EAP for a in live_agents):
        # An EAP gateway serves a capability only while a live external agent can take it.
        reachable = external_capabilities()
        for agent in live_agents:
            if agent.executor == Agent.Executor.EAP:
                agent.capabilities = [c for c in agent.capabilities if c in reachable]
    stale = timezone.now() - timedelta(seconds=settings.DEGRADED_AFTER_SECONDS)
    moved = {"degraded": 0, "recovered": 0, "rerouted": 0}
    # Running sessions with a ready task might degrade; every degraded one might recover (its
    # ready tasks may all have been claimed since).
    has_queued = Exists(Task.objects.filter(session=OuterRef("pk"), status=Task.Status.QUEUED))
    sessions = Session.objects.filter(status__in=(Session.Status.RUNNING, Session.Status.DEGRADED)).filter(
        Q(status=Session.Status.DEGRADED) | has_queued
    )
    for session in sessions:
        # Read once: rerouting changes neither a task's status nor when it was queued.
        queued = list(session.tasks.filter(status=Task.Status.QUEUED))
        for task in queued:
            task.session = session
        waited = [t for t in queued if t.queued_at is not None and t.queued_at < stale]
        moved["rerouted"] += _reroute_stranded(waited, live_agents)
        if session.status == Session.Status.RUNNING:
            reasons = [r for t in waited if (r := _stranded_reason(t, live_agents))]
            if reasons and session.transition(
                Session.Status.DEGRADED, reason="; ".join(reasons), only_from=frozenset({Session.Status.RUNNING})
            ):
                moved["degraded"] += 1
        elif not any(_stranded_reason(t, live_agents) for t in queued):
            reason = "every ready task has a live agent again"
            if session.transition(
                Session.Status.RUNNING, reason=reason, only_from=frozenset({Session.Status.DEGRADED})
            ):
                moved["recovered"] += 1
    return moved


def sweep_stuck_sessions() -> dict[str, int]:
    """Move on the sessions that nothing else would: past their deadline (timeout), waiting
    on messages the broker lost (sent again) or on tasks nobody released, finished but never
    settled, or running while still marked queued."""
    done = {"timed_out": 0, "resent": 0, "released": 0, "released_held": 0, "settled": 0, "marked_running": 0}
    now = timezone.now()
    for session in Session.objects.filter(status__in=ACTIVE, deadline__lt=now):
        if time_out(session):
            done["timed_out"] += 1
    done["resent"] = redispatch_lost_messages()
    done["released"] = release_forgotten_tasks()
    # A slot freed where no held task was looking (a session settled, paused or was cancelled;
    # an agent joined): what fair share has room for now goes.
    done["released_held"] = sum(release_held(capability) for capability in fairshare.held_capabilities())
    unfinished = Task.objects.filter(session=OuterRef("pk"), status__in=Task.UNFINISHED)
    for session in Session.objects.filter(status__in=ACTIVE).exclude(Exists(unfinished)):
        if settle_session(session.pk):
            done["settled"] += 1
    running = Task.objects.filter(status=Task.Status.RUNNING, session__status=Session.Status.QUEUED).select_related(
        "agent"
    )
    for task in {task.session_id: task for task in running}.values():  # one per session
        if mark_session_running(task.session_id, task.key, task.agent.name if task.agent else "an agent"):
            done["marked_running"] += 1
    return done


def time_out(session: Session) -> bool:
    """A session past its deadline stops: open tasks are cancelled, running executors told to
    abort. One that never started a task fails instead (the state machine has no queued -> timeout).
    Decided under the lock: a retry may have given it a new deadline, a claim may have started it."""
    now = timezone.now()

    def target(row: Session) -> str | None:
        if row.deadline is None or row.deadline >= now:
            return None
        return Session.Status.FAILED if row.status == Session.Status.QUEUED else Session.Status.TIMEOUT

    def stop_tasks(row: Session) -> None:
        stop_open_tasks(row.pk, reason=f"session {row.status}: deadline passed", revoke=True, cause="user")

    late = f"deadline {session.deadline:%Y-%m-%d %H:%M:%S} UTC passed ({session.timeout_seconds}s)"
    reason = f"{late} before any task started" if session.status == Session.Status.QUEUED else late
    event = session.transition(target, reason=reason, actor="beat", only_from=ACTIVE, effects=stop_tasks)
    return event is not None


def redispatch_lost_messages() -> int:
    """Send again the run_task message of every queued task that neither the broker nor a live
    worker holds LOST_MESSAGE_AFTER_SECONDS after the task was queued (Redis restarted without
    its data, a message dropped; tasks/broker.py). A task that leaves its canvas takes its
    descendants with it: the database releases them from now on. A duplicate message is harmless
    (the claim is a compare-and-set)."""
    since = timezone.now() - timedelta(seconds=settings.LOST_MESSAGE_AFTER_SECONDS)
    candidates = Task.objects.filter(
        status=Task.Status.QUEUED, queued_at__lt=since, session__status__in=ACTIVE
    ).exclude(fairshare.HELD)  # no message yet: fair share sends it
    # The tasks on a queue with messages waiting are looked at once it drains: left out before
    # the batch is cut, so that a long backlog on one queue does not hide a lost message elsewhere.
    queues = set(candidates.exclude(dispatched_to="").values_list("dispatched_to", flat=True).distinct())
    busy = busy_queues(queues) if queues else set()
    if busy is None:
        return 0
    waiting = list(
        candidates.exclude(dispatched_to__in=busy)
        .select_related("session")
        .order_by("queued_at")[: settings.SWEEP_BATCH]
    )
    if not waiting:
        return 0
    lost = lost_message_ids({t.message_id: t.dispatched_to or t.queue for t in waiting})
    if lost is None:
        return 0
    lost_by_session = defaultdict(list)
    for task in waiting:
        if task.message_id not in lost:
            continue
        if resend_queued_task(task, queued_at=timezone.now()):
            lost_by_session[task.session].append(task.key)
    for session, keys in lost_by_session.items():
        what = f"{len(keys)} queued task(s) ({', '.join(sorted(keys)[:10])})"
        session.note(f"the broker no longer held the messages of {what}; sent again", actor="beat")
        logger.warning("session %s: re-sent %s", session.pk, what)
    return sum(len(keys) for keys in lost_by_session.values())


def release_forgotten_tasks() -> int:
    """Release the pending tasks whose upstreams all finished LOST_MESSAGE_AFTER_SECONDS ago or
    more: the worker that recorded the last of them died before it released what follows (a
    fan-in is released after the record commits). Queued, or skipped behind a blocking upstream,
    as the worker would have; the release is a compare-and-set."""
    since = timezone.now() - timedelta(seconds=settings.LOST_MESSAGE_AFTER_SECONDS)
    forgotten = (
        Task.objects.filter(status=Task.Status.PENDING, upstream_open=0, session__status__in=ACTIVE)
        .exclude(depends_on__finished_at__gte=since)
        .exclude(depends_on__finished_at=None)
        .values_list("session_id", "pk")[: settings.SWEEP_BATCH]
    )
    by_session = defaultdict(list)
    for session_id, pk in forgotten:
        by_session[session_id].append(pk)
    released = 0
    for session_id, ids in by_session.items():
        session = Session.objects.get(pk=session_id)
        moved, to_send = release_tasks(ids)
        send_released(to_send)
        keys = sorted(Task.objects.filter(pk__in=[pk for pk in ids if pk in moved]).values_list("key", flat=True))
        if keys:
            session.note(
                f"released {', '.join(keys[:10])}: their upstreams had finished, nobody released them", actor="beat"
            )
            released += len(keys)
    return released


def apply_retention() -> int:
    """Delete sessions settled more than SESSION_RETENTION_DAYS ago, with their tasks, events,
    checkpoints, workspace directories and `io/session-*` branches (0 keeps everything)."""
    days = settings.SESSION_RETENTION_DAYS
    if not days:
        return 0
    cutoff = timezone.now() - timedelta(days=days)
    old = Session.objects.filter(status__in=SETTLED, finished_at__lt=cutoff).order_by("finished_at")
    deleted = _delete_in_batches(old)
    if deleted:
        logger.info("retention: deleted %d sessions settled before %s", deleted, cutoff)
    return deleted


ABANDONED = frozenset({Session.Status.PENDING, Session.Status.PAUSED})


def delete_abandoned_sessions() -> int:
    """Delete sessions left pending (never started) or paused and untouched (updated_at) for
    more than ABANDONED_SESSION_DAYS, as retention deletes settled ones (0 keeps them). A paused
    session with a task still running is left until that task has finished."""
    days = settings.ABANDONED_SESSION_DAYS
    if not days:
        return 0
    cutoff = timezone.now() - timedelta(days=days)
    running = Task.objects.filter(session=OuterRef("pk"), status=Task.Status.RUNNING)
    abandoned = Session.objects.filter(status__in=ABANDONED, updated_at__lt=cutoff).exclude(Exists(running))
    deleted = _delete_in_batches(abandoned.order_by("updated_at"))
    if deleted:
        logger.info("retention: deleted %d sessions abandoned in pending or paused before %s", deleted, cutoff)
    return deleted


def _delete_in_batches(sessions) -> int:
    """Delete `sessions` (a query that re-checks their status) SWEEP_BATCH at a time, each batch
    in its own transaction so a backlog never holds long locks, then their files and branches."""
    deleted = 0
    while True:
        with transaction.atomic():
            # Locked as a transition locks them: a retry or resume that comes first keeps its session.
            locked = sessions.select_for_update(skip_locked=True).values_list("pk", "repository")
            batch = list(locked[: settings.SWEEP_BATCH])
            if not batch:
                break
            Session.objects.filter(pk__in=[pk for pk, _ in batch]).delete()
        for pk, repository in batch:  # after the commit: a rolled-back delete keeps its workspace
            discard_session_files(Session(pk=pk, repository=repository))
        deleted += len(batch)
    return deleted
