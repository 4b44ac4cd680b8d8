import os
from datetime import timedelta

import pytest
from django.utils import timezone

from agents import services
from agents.models import Agent, AgentEvent
from sessions.models import Session
from tasks.fleet import record_heartbeat, register_worker
from tasks.models import Task
from tasks.tasks import mark_silent_agents_offline
from tenants.models import Tenant
from tests.test_execution import make_session

from .conftest import member_client, staff_client, wait_until


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


def test_a_heartbeat_reads_only_the_latest_finishes_however_long_the_history(db, settings):
    settings.AGENT_STATS_WINDOW_TASKS = 3
    agent = make_agent("veteran", concurrency=4)
    # Oldest first: the two failures are older than the three latest finishes.
    give_tasks(agent, ("failed", 50), ("failed", 50), ("completed", 10), ("failed", 20), ("completed", 30))

    record_heartbeat(agent)

    agent.refresh_from_db()
    assert (agent.tasks_completed, agent.tasks_failed) == (2, 1)
    assert agent.ewma_duration_s == pytest.approx((10 * 0.8 + 20 * 0.2) * 0.8 + 30 * 0.2)


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


@pytest.fixture
def fleet(db):
    """A platform worker (no tenant) and an external agent of each of two tenants, all online."""
    member_client("acme", "setup")
    member_client("globex", "setup")

    def external(name: str, tenant: str) -> Agent:
        return Agent.objects.create(
            name=name, executor="eap", capabilities=["testing"], status="online", hostname=f"{name}.example",
            tenant=Tenant.objects.get(slug=tenant),
        )  # fmt: skip

    return {
        "platform": make_agent("platform-1", status="online", hostname="gpu-07.internal"),
        "acme": external("acme-ext", "acme"),
        "globex": external("globex-ext", "globex"),
    }


@pytest.mark.parametrize(
    ("who", "target", "expected"),
    [
        ("acme operator", "platform", 403),  # an operator in some tenant is not the platform's
        ("acme admin", "platform", 403),
        ("staff", "platform", 202),
        ("acme operator", "acme", 202),
        ("acme developer", "acme", 403),
        ("acme viewer", "acme", 403),
        ("acme operator, globex viewer", "globex", 403),  # seen there, but only as a viewer
        ("acme operator", "globex", 404),  # not a member: not even seen
        ("staff", "globex", 404),  # staff steer the platform's workers, not a tenant's agents
    ],
)
@pytest.mark.parametrize("action", ["drain", "resume"])
def test_who_may_drain_and_resume_which_agent(fleet, who, target, expected, action):
    client = client_for(who)
    agent = fleet[target]
    before = "draining" if action == "resume" else "online"
    Agent.objects.filter(pk=agent.pk).update(status=before)

    response = client.post(f"/api/v1/agents/{agent.pk}/{action}/")

    assert response.status_code == expected, response.content
    after = {"drain": "draining", "resume": "online"}[action] if expected == 202 else before
    assert Agent.objects.get(pk=agent.pk).status == after
    assert AgentEvent.objects.filter(agent=agent).count() == (1 if expected == 202 else 0)


def test_a_drain_and_a_resume_through_the_api_are_audited_with_who_did_them(fleet):
    client = client_for("acme operator")
    agent = fleet["acme"]

    assert client.post(f"/api/v1/agents/{agent.pk}/drain/").status_code == 202
    assert client.post(f"/api/v1/agents/{agent.pk}/resume/").status_code == 202

    events = AgentEvent.objects.filter(agent=agent).order_by("id")
    assert [(e.action, e.actor, e.from_status, e.to_status, e.agent_name) for e in events] == [
        ("drain", "user:pat", "online", "draining", "acme-ext"),
        ("resume", "user:pat", "draining", "online", "acme-ext"),
    ]


def test_agent_events_are_append_only_and_outlive_their_agent(fleet):
    event = services.drain_agent(fleet["platform"], actor="user:root", reason="kernel upgrade")

    with pytest.raises(ValueError, match="append-only"):
        event.save()
    fleet["platform"].delete()

    event = AgentEvent.objects.get()
    assert (event.agent_id, event.agent_name, event.reason) == (None, "platform-1", "kernel upgrade")


def test_platform_workers_host_names_are_shown_to_staff_only(fleet):
    def hostnames(client) -> dict:
        return {a["name"]: a["hostname"] for a in client.get("/api/v1/agents/").json()["results"]}

    assert hostnames(client_for("acme operator"))["platform-1"] == ""
    assert client_for("acme admin").get(f"/api/v1/agents/{fleet['platform'].pk}/").json()["hostname"] == ""
    assert hostnames(staff_client())["platform-1"] == "gpu-07.internal"


def client_for(who: str):
    """ "staff", or one user's memberships: "acme operator, globex viewer"."""
    if who == "staff":
        return staff_client()
    clients = [member_client(tenant, "pat", role=role) for tenant, role in (part.split() for part in who.split(", "))]
    return clients[-1]  # every one authenticates the same user
