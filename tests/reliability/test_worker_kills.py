"""R1: agent workers killed with SIGKILL while they run tasks, over 20 sessions. Every session
completes, and each task's side effect (the scripted executor's counter) happened exactly once."""

import os
import signal
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from agents.executors.scripted import side_effects_of
from agents.models import Agent
from sessions.models import Session, SessionEvent
from tasks.models import Task
from tests.conftest import create_and_start, member_client, wait_until

from .conftest import settled

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.every_broker]

SESSIONS = 20
TASK_S = 3.0  # each task's run; its side effect happens at the end
KILLS = 6  # half of them a pool process, half a whole agent with its pool
STEPS = ["one", "two", "three"]


def chain_with_side_effects() -> dict:
    params = {"duration_s": TASK_S, "count_side_effect": True}
    return {
        "requirements": "three steps, each with a side effect",
        "tasks": [
            {"key": key, "title": key, "capability": "code_generation", "params": params, "depends_on": STEPS[:i][-1:]}
            for i, key in enumerate(STEPS)
        ],
    }


def just_started(session_ids):
    """Running tasks well before their side effect: a kill must land mid-run, not between the
    effect and the record (no executor can make that window exactly-once)."""
    recent = timezone.now() - timedelta(seconds=TASK_S / 2)
    running = Task.objects.filter(session_id__in=session_ids, status="running").exclude(worker_pid=None)
    return running.filter(started_at__gt=recent), running.filter(started_at__lte=recent)


def pool_victim(session_ids, spared) -> Task | None:
    """A task just started, not one killed before (three kills would use up its attempts)."""
    fresh, _ = just_started(session_ids)
    return fresh.exclude(pk__in=spared).select_related("agent").first()


def agent_victim(session_ids, spared) -> Agent | None:
    """An agent whose every running task has just started (its whole pool dies), none of them
    killed before."""
    fresh, late = just_started(session_ids)
    busy = set(fresh.values_list("agent_id", flat=True))
    unsafe = set(late.values_list("agent_id", flat=True)) | set(
        fresh.filter(pk__in=spared).values_list("agent_id", flat=True)
    )
    return Agent.objects.filter(pk__in=busy - unsafe).first()


def test_agents_killed_mid_task_lose_no_work_and_repeat_no_side_effect(sweeping):
    agents = ("alpha", "beta")
    for name in agents:
        sweeping.agent(name, ["code_generation"], concurrency=2)
    client = member_client("acme", "alice")
    session_ids = [create_and_start(client, chain_with_side_effects()) for _ in range(SESSIONS)]

    kills: list[tuple[str, str, list]] = []  # (what, agent, the tasks it ran)
    while len(kills) < KILLS:
        killed = [pk for _, _, pks in kills for pk in pks]
        if len(kills) % 2 == 0:
            task = wait_until(lambda k=killed: pool_victim(session_ids, k), interval=0.05, what="a task to kill")
            os.kill(task.worker_pid, signal.SIGKILL)  # the pool process dies; its agent lives on
            kills.append(("pool process", task.agent.name, [task.pk]))
        else:
            agent = wait_until(lambda k=killed: agent_victim(session_ids, k), interval=0.05, what="an agent to kill")
            victims = list(Task.objects.filter(agent=agent, status="running").values_list("pk", flat=True))
            sweeping.kill(agent.name)  # the whole agent, as if its host died
            kills.append(("agent", agent.name, victims))
            sweeping.agent(agent.name, ["code_generation"], concurrency=2)  # it comes back
        time.sleep(1.0)

    def report() -> str:
        statuses = Session.objects.filter(pk__in=session_ids).values_list("pk", "status")
        return f"kills {kills}; sessions {sorted(statuses, key=str)}"

    wait_until(lambda: len(settled(session_ids)) == SESSIONS, timeout=150, interval=0.5, what=report)

    assert set(settled(session_ids).values()) == {"completed"}, report()
    for session_id in session_ids:
        effects = side_effects_of(session_id)
        events = list(SessionEvent.objects.filter(session_id=session_id).values_list("reason", flat=True))
        assert effects == dict.fromkeys(STEPS, 1), (session_id, effects, events, kills)
    killed = [pk for _, _, pks in kills for pk in pks]
    not_rerun = Task.objects.filter(pk__in=killed, attempts__lt=2)
    assert not not_rerun.exists(), (list(not_rerun.values("pk", "attempts", "status")), kills)
    recoveries = SessionEvent.objects.filter(session_id__in=session_ids, actor="beat", reason__contains="re-queued")
    print(f"{len(kills)} kills of {len(killed)} running tasks; {recoveries.count()} recoveries logged")
    assert recoveries.count() >= len(killed), (recoveries.count(), kills)
