"""The agent workers as the engine sees them: a worker registering (its last run's claims taken
back), its heartbeats (load and counters counted from its latest task rows, its tasks' leases
renewed), and agents gone silent marked offline with their tasks taken back."""

import os
import socket
from datetime import timedelta

from django.conf import settings
from django.db.models import Case, Value, When
from django.utils import timezone

from agents.models import Agent, latest_finishes, recent_figures
from orchestrator_project import metrics

from .leases import recover_tasks_of, renew_leases
from .models import Task, running


class NameTaken(Exception):
    """The name belongs to an external agent (EAP); a worker cannot take its row over."""


def register_worker(*, name: str, capabilities: list[str], executor: str, concurrency: int) -> Agent:
    """The agent's row, new or taken over from the agent's last run, offline until its worker
    consumes. That run's claims died with it: they are taken back now, not when their leases run
    out (a restarted pool may even reuse the dead run's pids, whose leases would then be
    renewed). Raises NameTaken for the name of an external agent."""
    if Agent.objects.filter(name=name).exclude(mode=Agent.Mode.WORKER).exists():
        # Taking the row over would turn a registered external agent into a worker.
        raise NameTaken(name)
    agent, _ = Agent.objects.update_or_create(
        name=name,
        defaults={
            "capabilities": capabilities,
            "executor": executor,
            "concurrency": concurrency,
            "current_load": 0,
            "status": Agent.Status.OFFLINE,
            "hostname": socket.gethostname(),
            "worker_name": f"{name}@{socket.gethostname()}",
            "pid": os.getpid(),
        },
    )
    recover_tasks_of(agent, f"agent {name} restarted while running")
    return agent


def record_heartbeat(agent: Agent, processes: list[int] | None = None) -> None:
    """Say the agent is alive, and refresh its load and counters from its tasks. With
    `processes` (the worker's live pool processes), store them and renew the leases of the
    tasks they run.

    The task rows are the truth: counting there, rather than bumping counters with every
    claim and outcome, keeps the agent's row out of the hot path (concurrent tasks of one agent
    would queue on its lock) and cannot drift when a worker dies mid-task. The cost does not
    grow with the agent's history: the load counts its running tasks (a partial index holds
    only those), and the counters and the EWMA read at most AGENT_STATS_WINDOW_TASKS of its
    latest finishes within AGENT_STATS_WINDOW_HOURS (a backward scan of the (agent,
    finished_at) index). Between beats the stored figures may lag; routing counts the live load
    itself (tasks.routing).
    """
    load = Task.objects.filter(running(), agent_id=agent.pk).count()
    figures = recent_figures(
        (status == Task.Status.COMPLETED, status == Task.Status.FAILED, started, finished)
        for status, started, finished in latest_finishes(
            Task.objects.filter(agent_id=agent.pk), "status", "started_at", "finished_at"
        )
    )
    # One statement, so a concurrent drain is never overwritten by a heartbeat.
    Agent.objects.filter(pk=agent.pk).update(
        last_heartbeat=timezone.now(),
        status=Case(
            When(status=Agent.Status.DRAINING, then=Value(Agent.Status.DRAINING)),
            When(concurrency__lte=load, then=Value(Agent.Status.BUSY)),
            default=Value(Agent.Status.ONLINE),
        ),
        current_load=load,
        **figures,
        **({} if processes is None else {"processes": processes}),
    )
    metrics.HEARTBEATS.labels(agent.name).inc()
    if processes is not None:
        renew_leases(agent_id=agent.pk)


def mark_silent_agents_offline() -> dict[str, int]:
    """An agent that has not beaten for AGENT_OFFLINE_AFTER_SECONDS is offline, and the tasks
    it was running are taken back at once (re-queued, or orphaned when their attempts are used
    up) rather than when their leases run out."""
    silent_since = timezone.now() - timedelta(seconds=settings.AGENT_OFFLINE_AFTER_SECONDS)
    done = {"offline": 0, "recovered": 0}
    for agent in Agent.objects.exclude(status=Agent.Status.OFFLINE).filter(last_heartbeat__lt=silent_since):
        # Compare-and-set: an agent that beat meanwhile, or a second sweep, changes nothing.
        went = Agent.objects.filter(pk=agent.pk, last_heartbeat=agent.last_heartbeat).exclude(
            status=Agent.Status.OFFLINE
        )
        if not went.update(status=Agent.Status.OFFLINE):
            continue
        done["offline"] += 1
        silent_for = (timezone.now() - agent.last_heartbeat).total_seconds()
        why = f"agent {agent.name} went silent (no heartbeat for {silent_for:.0f}s) while running"
        done["recovered"] += recover_tasks_of(agent, why)
    return done
