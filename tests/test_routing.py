from django.utils import timezone

from agents.models import Agent
from sessions.models import Session
from tasks.models import Task
from tasks.routing import affinity_agent, queue_for
from tenants.models import Tenant


def agent(name: str, **fields) -> Agent:
    defaults = {
        "executor": "scripted",
        "capabilities": ["code_generation"],
        "status": "online",
        "last_heartbeat": timezone.now(),
        "concurrency": 2,
    }
    return Agent.objects.create(name=name, **(defaults | fields))


def test_a_brand_new_agent_scores_at_least_as_well_as_a_proven_one(db):
    veteran = agent("veteran", tasks_completed=500, tasks_failed=5, ewma_duration_s=12.0)
    newcomer = agent("newcomer")

    assert newcomer.score >= veteran.score


def test_failures_load_and_slowness_lower_the_score(db):
    good = agent("good", tasks_completed=100, ewma_duration_s=5.0)

    assert agent("flaky", tasks_completed=50, tasks_failed=50, ewma_duration_s=5.0).score < good.score
    assert agent("loaded", tasks_completed=100, ewma_duration_s=5.0, current_load=2).score < good.score
    assert agent("slow", tasks_completed=100, ewma_duration_s=600.0).score < good.score


def test_a_full_draining_offline_or_incapable_agent_cannot_take_work(db):
    assert agent("ok").can_take("code_generation")
    assert not agent("full", current_load=2).can_take("code_generation")
    assert not agent("draining", status="draining").can_take("code_generation")
    assert not agent("silent", last_heartbeat=timezone.now() - timezone.timedelta(hours=1)).can_take("code_generation")
    assert not agent("reviewer-only", capabilities=["code_review"]).can_take("code_generation")


def make_tasks():
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    session = Session.objects.create(tenant=tenant, title="t", requirements="r", status="running")
    up = Task.objects.create(session=session, key="up", title="up", capability="code_generation", status="completed")
    down = Task.objects.create(session=session, key="down", title="down", capability="code_generation")
    down.depends_on.set([up])
    return up, down


def test_a_task_follows_its_upstreams_agent_when_it_has_room(db):
    up, down = make_tasks()
    Task.objects.filter(pk=up.pk).update(agent=agent("left"))
    agent("right")

    assert affinity_agent(down).name == "left"
    assert queue_for(down) == "agent.left"


def test_a_task_goes_to_its_capability_queue_when_the_upstreams_agent_is_full(db):
    up, down = make_tasks()
    left = agent("left")  # concurrency 2; its stored load (0) lags behind the running tasks
    Task.objects.filter(pk=up.pk).update(agent=left)
    for key in ("busy-1", "busy-2"):
        Task.objects.create(
            session=up.session, key=key, title=key, capability="code_generation", status="running", agent=left
        )

    assert queue_for(down) == "cap.code_generation"


def test_a_pinned_task_always_goes_to_its_agent(db):
    up, down = make_tasks()
    Task.objects.filter(pk=up.pk).update(agent=agent("left"))
    down.pinned_agent = "gpu-box"

    assert queue_for(down) == "agent.gpu-box"
