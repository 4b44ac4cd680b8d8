"""End to end: REST API -> Celery canvas on cap.* queues -> real agent worker processes -> back.

Each test starts real processes (an orchestrator worker and `manage.py run_agent` agents) on
the test database and the test Redis database; nothing is mocked.
"""

import time

import pytest

from sessions.models import Checkpoint, Session, SessionEvent
from tasks.models import Task

from .conftest import (
    ALL_BUILD,
    ALL_QA,
    chain_payload,
    create_and_start,
    dag_payload,
    member_client,
    task_status,
    wait_for_status,
    wait_until,
)

pytestmark = [pytest.mark.e2e, pytest.mark.every_broker]


def event_path(session_id: str) -> list[str]:
    events = list(SessionEvent.objects.filter(session_id=session_id).order_by("id"))
    return [events[0].from_status, *(e.to_status for e in events)] if events else []


@pytest.fixture
def client(stack):
    return member_client("acme", "alice")


@pytest.fixture
def agents(stack):
    stack.agent("builder", ALL_BUILD)
    stack.agent("reviewer", ALL_QA)
    return stack


def test_a_six_task_dag_runs_to_completed_on_real_workers(client, agents):
    session_id = create_and_start(client, dag_payload())

    body = wait_for_status(client, session_id, {"completed", "failed", "partially_completed"})

    assert body["status"] == "completed"
    assert body["task_counts"]["completed"] == 6
    assert event_path(session_id) == ["pending", "queued", "running", "completed"]
    # The first claim moved it to running (the orchestrator did, while the task ran).
    running = SessionEvent.objects.get(session_id=session_id, to_status="running")
    assert (running.reason, running.actor) == ("task design claimed by builder", "agent:builder")
    tasks = client.get(f"/api/v1/sessions/{session_id}/tasks/").json()["results"]
    ran_by = {t["key"]: t["agent"] for t in tasks}
    assert ran_by == {
        "design": "builder",
        "api": "builder",
        "ui": "builder",
        "tests": "reviewer",
        "review": "reviewer",
        "docs": "reviewer",
    }
    assert all(t["attempts"] == 1 and t["result"]["simulated"] for t in tasks)
    # Dependencies were respected: nothing started before all its upstreams finished.
    by_key = {t.key: t for t in Task.objects.filter(session_id=session_id).prefetch_related("depends_on")}
    for task in by_key.values():
        for up in task.depends_on.all():
            assert up.finished_at <= task.started_at, f"{task.key} started before {up.key} finished"
    assert Checkpoint.objects.filter(session_id=session_id).count() == 6
    listed = client.get("/api/v1/agents/").json()["results"]
    assert {a["name"]: a["status"] for a in listed} == {"builder": "online", "reviewer": "online"}


def test_a_failed_required_task_skips_its_descendants_and_fails_the_session(client, agents):
    payload = dag_payload()
    payload["tasks"][1]["params"] = {"fail_rate": 1.0}  # "api" always fails

    session_id = create_and_start(client, payload)
    body = wait_for_status(client, session_id, {"completed", "failed", "partially_completed"})

    assert body["status"] == "failed"
    statuses = dict(Task.objects.filter(session_id=session_id).values_list("key", "status"))
    assert statuses == {
        "design": "completed",
        "api": "failed",
        "ui": "completed",
        "tests": "completed",
        "review": "skipped",
        "docs": "skipped",
    }
    assert "simulated failure" in Task.objects.get(session_id=session_id, key="api").error


def test_a_failed_optional_task_ends_partially_completed(client, agents):
    payload = dag_payload()
    payload["tasks"][2].update(required=False, params={"fail_rate": 1.0})  # "ui" is optional and fails

    session_id = create_and_start(client, payload)
    body = wait_for_status(client, session_id, {"completed", "failed", "partially_completed"})

    assert body["status"] == "partially_completed"
    statuses = dict(Task.objects.filter(session_id=session_id).values_list("key", "status"))
    assert statuses["ui"] == "failed"
    assert statuses["review"] == statuses["docs"] == "completed"


def test_pause_stops_new_tasks_and_resume_finishes_the_session(client, agents):
    session_id = create_and_start(client, chain_payload(1.0))
    wait_until(lambda: task_status(session_id, "one") == "running", what="task one running")

    assert client.post(f"/api/v1/sessions/{session_id}/pause/").status_code == 202
    wait_until(lambda: task_status(session_id, "one") == "completed", what="task one to finish while paused")
    time.sleep(2.0)  # long enough for task two to have started had the pause not held it

    assert task_status(session_id, "two") in ("pending", "queued")
    assert Session.objects.get(pk=session_id).status == "paused"

    assert client.post(f"/api/v1/sessions/{session_id}/resume/").status_code == 202
    body = wait_for_status(client, session_id, {"completed", "failed"})
    assert body["status"] == "completed"
    assert Task.objects.get(session_id=session_id, key="one").attempts == 1


def test_cancel_while_running_aborts_the_executor_and_cancels_open_tasks(client, agents):
    session_id = create_and_start(client, chain_payload(30.0))
    wait_until(lambda: task_status(session_id, "one") == "running", what="task one running")
    # The orchestrator marks the session running shortly after the first claim; until then a
    # cancel finds it queued and cancels it instead of stopping it.
    wait_for_status(client, session_id, {"running"})

    response = client.post(f"/api/v1/sessions/{session_id}/cancel/")

    assert response.status_code == 202 and response.json()["status"] == "stopped"
    # The scripted executor would sleep 30 s; the abort signal ends it within a poll.
    wait_until(lambda: task_status(session_id, "one") == "cancelled", timeout=10, what="task one aborted")
    statuses = dict(Task.objects.filter(session_id=session_id).values_list("key", "status"))
    assert statuses == {"one": "cancelled", "two": "cancelled", "three": "cancelled"}
    assert "aborted" in Task.objects.get(session_id=session_id, key="one").error
    assert Session.objects.get(pk=session_id).status == "stopped"


def test_retry_reruns_only_what_did_not_complete(client, agents):
    payload = dag_payload()
    payload["tasks"][4]["params"] = {"fail_rate": 1.0}  # "review" fails the first time
    session_id = create_and_start(client, payload)
    wait_for_status(client, session_id, {"failed"})
    first_run = {t.key: t.started_at for t in Task.objects.filter(session_id=session_id, status="completed")}
    Task.objects.filter(session_id=session_id, key="review").update(params={})  # the fix lands

    assert client.post(f"/api/v1/sessions/{session_id}/retry/").status_code == 202
    body = wait_for_status(client, session_id, {"completed", "failed"})

    assert body["status"] == "completed"
    assert set(first_run) == {"design", "api", "ui", "tests"}
    for task in Task.objects.filter(session_id=session_id, key__in=first_run):
        assert task.started_at == first_run[task.key] and task.attempts == 1, f"{task.key} ran again"
    assert event_path(session_id)[-3:] == ["queued", "running", "completed"]


def test_two_roots_and_consecutive_parallel_levels_run_to_completed(client, agents):
    # Levels [a, b] -> [c, d] -> [e]: a chord whose body is another chord.
    edges = {"a": [], "b": [], "c": ["a"], "d": ["b"], "e": ["c", "d"]}
    payload = {
        "requirements": "two independent streams joined at the end",
        "tasks": [{"key": k, "title": k, "capability": "code_generation", "depends_on": v} for k, v in edges.items()],
    }

    session_id = create_and_start(client, payload)
    body = wait_for_status(client, session_id, {"completed", "failed", "partially_completed"})

    assert body["status"] == "completed" and body["task_counts"]["completed"] == 5
