from datetime import timedelta

import pytest
from django.utils import timezone

from agents.models import Agent
from sessions.models import Session, SessionEvent
from sessions.sweeps import sweep_degraded_sessions
from tasks.models import Task
from tenants.models import Tenant


@pytest.fixture
def running_session(db, settings):
    settings.DEGRADED_AFTER_SECONDS = 5
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    session = Session.objects.create(tenant=tenant, title="t", requirements="r", status="running")
    Task.objects.create(
        session=session,
        key="api",
        title="api",
        capability="code_generation",
        status="queued",
        queued_at=timezone.now() - timedelta(seconds=60),
    )
    return session


def live_agent(name: str, capabilities: list[str]) -> Agent:
    return Agent.objects.create(
        name=name, executor="scripted", capabilities=capabilities, status="online", last_heartbeat=timezone.now()
    )


def test_a_ready_task_without_a_live_agent_degrades_the_session_and_says_why(running_session):
    live_agent("reviewer", ["code_review"])
    Agent.objects.create(name="builder", executor="scripted", capabilities=["code_generation"], status="offline")

    assert sweep_degraded_sessions() == {"degraded": 1, "recovered": 0, "rerouted": 0}

    event = SessionEvent.objects.get(session=running_session)
    assert (event.from_status, event.to_status) == ("running", "degraded")
    assert "needs code_generation and no live agent has it" in event.reason


def test_the_session_recovers_when_an_agent_appears(running_session):
    sweep_degraded_sessions()
    live_agent("builder", ["code_generation"])

    assert sweep_degraded_sessions() == {"degraded": 0, "recovered": 1, "rerouted": 0}

    assert Session.objects.get(pk=running_session.pk).status == "running"


def test_a_task_pinned_to_an_offline_agent_degrades_even_if_others_could_run_it(running_session):
    live_agent("builder", ["code_generation"])
    running_session.tasks.update(pinned_agent="gpu-box")

    sweep_degraded_sessions()

    event = SessionEvent.objects.get(session=running_session)
    assert "pinned to agent gpu-box" in event.reason


def test_a_task_queued_only_moments_ago_does_not_degrade_yet(running_session):
    running_session.tasks.update(queued_at=timezone.now())

    assert sweep_degraded_sessions() == {"degraded": 0, "recovered": 0, "rerouted": 0}


def test_a_draining_agent_does_not_count_as_live(running_session):
    live_agent("builder", ["code_generation"])
    Agent.objects.filter(name="builder").update(status="draining")

    assert sweep_degraded_sessions()["degraded"] == 1


def test_a_task_stranded_on_a_gone_agents_queue_by_affinity_is_sent_again(running_session):
    live_agent("right", ["code_generation"])
    Agent.objects.create(name="left", executor="scripted", capabilities=["code_generation"], status="offline")
    task = running_session.tasks.get()
    after = Task.objects.create(session=running_session, key="docs", title="docs", capability="documentation")
    after.depends_on.set([task])
    running_session.tasks.filter(key="api").update(dispatched_to="agent.left", message_id="old")

    assert sweep_degraded_sessions()["rerouted"] == 1

    task.refresh_from_db()
    assert task.dispatched_to == "cap.code_generation" and task.message_id not in ("", "old")
    # The canvas chain behind the stranded message will never come: both are released from now on.
    assert not running_session.tasks.filter(via_canvas=True).exists()


def test_a_pinned_task_waits_for_its_agent_and_is_not_rerouted(running_session):
    Agent.objects.create(name="gpu-box", executor="scripted", capabilities=["code_generation"], status="offline")
    running_session.tasks.update(pinned_agent="gpu-box", dispatched_to="agent.gpu-box")

    assert sweep_degraded_sessions()["rerouted"] == 0
    assert running_session.tasks.get().dispatched_to == "agent.gpu-box"
