from datetime import timedelta

import pytest
from django.utils import timezone

from agents.models import Agent
from agents.tasks import mark_silent_agents_offline

from .conftest import wait_until


def make_agent(name: str, **fields) -> Agent:
    return Agent.objects.create(name=name, executor="scripted", capabilities=["testing"], **fields)


def test_silent_agents_are_marked_offline_and_live_ones_are_not(db):
    now = timezone.now()
    make_agent("silent", status="online", last_heartbeat=now - timedelta(minutes=5))
    make_agent("live", status="online", last_heartbeat=now)

    assert mark_silent_agents_offline() == 1

    assert dict(Agent.objects.values_list("name", "status")) == {"silent": "offline", "live": "online"}


def test_a_heartbeat_reports_busy_at_full_load_and_never_undoes_a_drain(db):
    busy = make_agent("busy", concurrency=1, current_load=1)
    draining = make_agent("draining", status="draining")

    busy.heartbeat()
    draining.heartbeat()

    assert Agent.objects.get(name="busy").status == "busy"
    assert Agent.objects.get(name="draining").status == "draining"
    assert Agent.objects.get(name="draining").last_heartbeat is not None


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
