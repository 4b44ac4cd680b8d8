import os
from datetime import timedelta

import pytest
from django.utils import timezone

from agents.models import Agent
from sessions.models import Session
from tasks.fleet import record_heartbeat, register_worker
from tasks.models import Task
from tasks.tasks import mark_silent_agents_offline
from tenants.models import Tenant
from tests.test_execution import make_session

from .conftest import wait_until


def make_agent(name: str, **fields) -> Agent:
    return Agent.objects.create(name=name, executor="scripted", capabilities=["testing"], **fields)


def test_silent_agents_are_marked_offline_and_live_ones_are_not(db):
    now = timezone.now()
    make_agent("silent", status="online", last_heartbeat=now - timedelta(minutes=5))
    make_agent("live", status="online", last_heartbeat=now)

    assert mark_silent_agents_offline() == {"offline": 1, "recovered": 0}

    assert dict(Agent.objects.values_list("name", "status")) == {"silent": "offline", "live": "online"}


def give_tasks(agent: Agent, *statuses_and_seconds: tuple[str, float]) -> None:
    tenant = Tenant.objects.create(slug=f"t-{agent.name}", name="T")
    session = Session.objects.create(tenant=tenant, title="t", requirements="r", status="running")
    start = timezone.now() - timedelta(hours=1)
    for i, (status, seconds) in enumerate(statuses_and_seconds):
        finished = start + timedelta(minutes=i, seconds=seconds) if status != "running" else None
        Task.objects.create(
            session=session, key=f"t{i}", title="t", capability="testing", status=status, agent=agent,
            started_at=start + timedelta(minutes=i), finished_at=finished,
        )  # fmt: skip


def test_a_heartbeat_reports_busy_at_full_load_and_never_undoes_a_drain(db):
    busy = make_agent("busy", concurrency=1, current_load=0)
    give_tasks(busy, ("running", 0))
    draining = make_agent("draining", status="draining")

    record_heartbeat(busy)
    record_heartbeat(draining)

    assert Agent.objects.get(name="busy").status == "busy"
    assert Agent.objects.get(name="draining").status == "draining"
    assert Agent.objects.get(name="draining").last_heartbeat is not None


def test_a_heartbeat_counts_load_outcomes_and_recent_duration_from_the_tasks(db):
    agent = make_agent("builder", concurrency=4, current_load=3, tasks_completed=99)  # stale figures
    give_tasks(agent, ("completed", 10), ("failed", 20), ("completed", 30), ("running", 0), ("cancelled", 5))

    record_heartbeat(agent)

    agent.refresh_from_db()
    assert (agent.current_load, agent.tasks_completed, agent.tasks_failed) == (1, 2, 1)
    # EWMA (alpha 0.2) of the finished durations, oldest first: 10, 20, 30, 5.
    assert agent.ewma_duration_s == pytest.approx(((10 * 0.8 + 20 * 0.2) * 0.8 + 30 * 0.2) * 0.8 + 5 * 0.2)
    assert agent.status == "online"


def test_agent_queues_are_its_capabilities_and_its_own_name(db):
    agent = make_agent("builder", status="online")

    assert agent.queues == ["cap.testing", "agent.builder"]


@pytest.mark.e2e
def test_run_agent_registers_heartbeats_and_goes_offline_on_shutdown(stack):
    stack.agent("builder", ["code_generation", "testing"])
    first = Agent.objects.get(name="builder").last_heartbeat

    wait_until(lambda: Agent.objects.get(name="builder").last_heartbeat > first, what="a second heartbeat")
    agent = Agent.objects.get(name="builder")
    assert agent.capabilities == ["code_generation", "testing"] and agent.is_live

    stack.stop()

    assert Agent.objects.get(name="builder").status == "offline"


def test_an_agent_that_starts_again_takes_back_the_claims_of_its_last_run(db, django_capture_on_commit_callbacks):
    agent = make_agent("builder", status="online", last_heartbeat=timezone.now())
    session = make_session({"a": []})
    Task.objects.filter(session=session).update(status="running", attempts=1, agent=agent, worker_pid=os.getpid())

    with django_capture_on_commit_callbacks(execute=True):
        register_worker(name="builder", capabilities=["testing"], executor="scripted", concurrency=2)

    task = Task.objects.get(session=session)
    assert (task.status, task.worker_pid) == ("queued", None)
    assert "agent builder restarted while running attempt 1" in task.error
