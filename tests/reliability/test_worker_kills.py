"""R1: agent workers killed with SIGKILL while they run tasks, over 20 sessions. Every session
completes, and each task's side effect (the scripted executor's counter) happened exactly once."""

import os
import signal
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from agents.executors.scripted import side_effects_of
from sessions.models import SessionEvent
from tasks.models import Task
from tests.conftest import create_and_start, member_client, wait_until

from .conftest import settled

pytestmark = pytest.mark.e2e

SESSIONS = 20
TASK_S = 2.0  # each task's run; its side effect happens at the end
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


def a_task_just_started(session_ids, spared) -> Task | None:
    """A running task well before its side effect: the kill must land mid-run, not between the
    effect and the record (no executor can make that window exactly-once). Not one killed before
    (three kills would use up its attempts)."""
    recent = timezone.now() - timedelta(seconds=TASK_S / 2)
    running = Task.objects.filter(session_id__in=session_ids, status="running", started_at__gt=recent)
    return running.exclude(worker_pid=None).exclude(pk__in=spared).select_related("agent").first()


def all_just_started(agent) -> bool:
    """Whether every task the agent runs is well before its side effect (a whole agent dies)."""
    recent = timezone.now() - timedelta(seconds=TASK_S / 2)
    return not Task.objects.filter(agent=agent, status="running", started_at__lte=recent).exists()


def test_agents_killed_mid_task_lose_no_work_and_repeat_no_side_effect(sweeping):
    agents = ("alpha", "beta")
    for name in agents:
        sweeping.agent(name, ["code_generation"], concurrency=2)
    client = member_client("acme", "alice")
    session_ids = [create_and_start(client, chain_with_side_effects()) for _ in range(SESSIONS)]

    kills = []
    deadline = time.monotonic() + 120
    while len(kills) < KILLS and time.monotonic() < deadline:
        killed = [pk for _, pk, _ in kills]
        task = wait_until(
            lambda killed=killed: a_task_just_started(session_ids, killed), timeout=30, interval=0.05, what="a victim"
        )
        if len(kills) % 2 == 1 and not all_just_started(task.agent):
            time.sleep(0.1)  # its other process may be past its side effect: not a clean kill point
            continue
        if len(kills) % 2 == 0:
            os.kill(task.worker_pid, signal.SIGKILL)  # the pool process dies; its agent lives on
            kills.append(("pool process", task.pk, task.agent.name))
        else:
            sweeping.kill(task.agent.name)  # the whole agent, as if its host died
            kills.append(("agent", task.pk, task.agent.name))
            sweeping.agent(task.agent.name, ["code_generation"], concurrency=2)  # it comes back
        time.sleep(1.0)
    assert len(kills) == KILLS, kills

    wait_until(lambda: len(settled(session_ids)) == SESSIONS, timeout=150, interval=0.5, what="every session to settle")

    assert set(settled(session_ids).values()) == {"completed"}
    for session_id in session_ids:
        assert side_effects_of(session_id) == dict.fromkeys(STEPS, 1), session_id
    rerun = Task.objects.filter(session_id__in=session_ids, attempts__gt=1).count()
    recoveries = SessionEvent.objects.filter(session_id__in=session_ids, actor="beat", reason__contains="re-queued")
    victims = [(kind, name) for kind, _, name in kills]
    print(f"{len(kills)} kills {victims}; {rerun} tasks ran again; {recoveries.count()} recoveries logged")
    assert rerun >= KILLS and recoveries.count() >= KILLS
