"""Task semantics and routing on real worker processes: database release of non-series-parallel
edges, retries with backoff, per-task deadlines, fail-fast, affinity, pinning and drain."""

import pytest

from agents.models import Agent
from sessions.models import Session
from tasks.models import Task
from tasks.sweeps import sweep_degraded_sessions

from .conftest import (
    consumed_queues,
    create_and_start,
    member_client,
    run_task_message_ids,
    staff_client,
    task_status,
    wait_for_status,
    wait_until,
)

pytestmark = pytest.mark.e2e
SETTLED = {"completed", "failed", "partially_completed", "stopped", "cancelled"}


@pytest.fixture
def client(stack):
    return member_client("acme", "alice")


def spec(key: str, deps: list[str], seconds: float = 0.0, capability: str = "code_generation", **params) -> dict:
    return {
        "key": key,
        "title": key,
        "capability": capability,
        "depends_on": deps,
        "params": {"duration_s": seconds, **params},
    }


def create(client, tasks: list[dict], **fields) -> str:
    payload = {"requirements": "semantics", "tasks": tasks, **fields}
    response = client.post("/api/v1/sessions/", payload, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def start(client, session_id: str) -> None:
    assert client.post(f"/api/v1/sessions/{session_id}/start/").status_code == 202


def tasks_of(session_id: str) -> dict[str, Task]:
    return {t.key: t for t in Task.objects.filter(session_id=session_id).select_related("agent")}


def test_a_non_series_parallel_edge_does_not_wait_for_an_unrelated_task(client, stack):
    stack.agent("builder", ["code_generation"], concurrency=4)
    # A->C, A->D, B->D: D needs A and B only. Canvas by levels would make D wait for slow C.
    tasks = [spec("A", [], 0.2), spec("B", [], 1.0), spec("C", ["A"], 3.0), spec("D", ["A", "B"], 0.2)]

    session_id = create_and_start(client, {"requirements": "n-shape", "tasks": tasks})
    body = wait_for_status(client, session_id, SETTLED)

    assert body["status"] == "completed"
    done = tasks_of(session_id)
    assert not any(t.via_canvas for t in done.values())
    assert done["D"].started_at >= max(done["A"].finished_at, done["B"].finished_at)
    assert done["D"].finished_at < done["C"].finished_at, "D waited for C"


def test_transient_errors_retry_with_backoff_until_the_task_succeeds(client, stack):
    stack.agent("builder", ["code_generation"])

    session_id = create_and_start(
        client, {"requirements": "flaky tool", "tasks": [spec("flaky", [], 0.0, transient_failures=2)]}
    )
    body = wait_for_status(client, session_id, SETTLED)

    assert body["status"] == "completed"
    assert tasks_of(session_id)["flaky"].attempts == 3


def test_a_task_past_its_own_deadline_fails_and_fails_the_session(client, stack):
    stack.agent("builder", ["code_generation"])
    session_id = create(client, [spec("slow", [], 20.0) | {"timeout_seconds": 1}])

    start(client, session_id)
    body = wait_for_status(client, session_id, SETTLED, timeout=30)

    assert body["status"] == "failed"
    assert "deadline of 1s exceeded" in tasks_of(session_id)["slow"].error


def test_fail_fast_cancels_the_rest_when_a_required_task_fails(client, stack):
    stack.agent("builder", ["code_generation"], concurrency=3)
    tasks = [
        spec("design", []),
        spec("api", ["design"], 0.2, fail_rate=1.0),
        spec("ui", ["design"], 20.0),
        spec("db", ["design"], 20.0),
        spec("review", ["api", "ui", "db"]),
    ]
    session_id = create(client, tasks, fail_fast=True)
    assert Session.objects.get(pk=session_id).fail_fast

    start(client, session_id)
    body = wait_for_status(client, session_id, SETTLED, timeout=20)

    assert body["status"] == "failed"
    statuses = {key: t.status for key, t in tasks_of(session_id).items()}
    assert statuses == {
        "design": "completed",
        "api": "failed",
        "ui": "cancelled",
        "db": "cancelled",
        "review": "cancelled",
    }


def test_fail_fast_settles_a_session_released_from_the_database(client, stack):
    # Not series-parallel: no canvas and no finalize link; the failing task must settle it.
    stack.agent("builder", ["code_generation"], concurrency=3)
    tasks = [
        spec("a", [], 0.3, fail_rate=1.0),
        spec("b", []),
        spec("c", ["a"]),
        spec("d", ["a", "b"]),
    ]
    session_id = create(client, tasks, fail_fast=True)

    start(client, session_id)
    body = wait_for_status(client, session_id, SETTLED, timeout=20)

    assert body["status"] == "failed"
    statuses = {key: t.status for key, t in tasks_of(session_id).items()}
    assert statuses == {"a": "failed", "b": "completed", "c": "cancelled", "d": "cancelled"}
    assert not any(t.via_canvas for t in tasks_of(session_id).values())


def test_a_chain_follows_the_agent_of_its_upstream(client, stack):
    # Enough slots that the upstream's agent always has room, so affinity applies to every hop.
    stack.agent("left", ["code_generation"], concurrency=3)
    stack.agent("right", ["code_generation"], concurrency=3)
    sessions = [
        create_and_start(
            client,
            {"requirements": f"chain {n}", "tasks": [spec(f"s{i}", [f"s{i - 1}"] if i else [], 0.1) for i in range(4)]},
        )
        for n in range(3)
    ]

    for session_id in sessions:
        assert wait_for_status(client, session_id, SETTLED)["status"] == "completed"

    for session_id in sessions:
        agents = {t.agent.name for t in tasks_of(session_id).values()}
        assert len(agents) == 1, f"session {session_id} hopped between agents {agents}"


def test_a_pinned_task_runs_only_on_its_agent_and_degrades_the_session_while_it_is_away(client, stack, settings):
    settings.DEGRADED_AFTER_SECONDS = 0
    stack.agent("builder", ["code_generation"], concurrency=2)
    Agent.objects.create(name="gpu-box", executor="scripted", capabilities=["code_generation"], status="offline")
    session_id = create(client, [spec("prep", [], 0.0), spec("train", ["prep"], 0.0) | {"agent": "gpu-box"}])

    start(client, session_id)
    wait_until(lambda: task_status(session_id, "train") == "queued", what="the pinned task to be ready")
    # Its message waits on gpu-box's own queue, which builder, free and able, does not consume.
    wait_until(lambda: run_task_message_ids("agent.gpu-box*"), what="the pinned task's message on agent.gpu-box")
    builder = Agent.objects.get(name="builder")
    assert "agent.gpu-box" not in consumed_queues(builder.worker_name)
    assert task_status(session_id, "train") == "queued"
    sweep_degraded_sessions()
    assert Session.objects.get(pk=session_id).status == "degraded"

    stack.agent("gpu-box", ["code_generation"])
    body = wait_for_status(client, session_id, SETTLED)
    sweep_degraded_sessions()

    assert body["status"] == "completed"
    assert tasks_of(session_id)["train"].agent.name == "gpu-box"


def test_a_drained_agent_takes_no_new_work_until_resumed(client, stack):
    stack.agent("builder", ["code_generation"])
    operator = staff_client()  # a platform worker: staff steer it
    agent_id = Agent.objects.get(name="builder").pk
    assert client.post(f"/api/v1/agents/{agent_id}/drain/").status_code == 403  # a developer may not
    tenant_operator = member_client("acme", "olga", role="operator")
    assert tenant_operator.post(f"/api/v1/agents/{agent_id}/drain/").status_code == 403  # nor a tenant's operator

    assert operator.post(f"/api/v1/agents/{agent_id}/drain/").status_code == 202
    worker = Agent.objects.get(pk=agent_id).worker_name
    wait_until(
        lambda: "cap.code_generation" not in (consumed_queues(worker) or {"no answer"}),
        what="builder to stop consuming cap.code_generation",
    )
    session_id = create_and_start(client, {"requirements": "drained", "tasks": [spec("one", [])]})

    def waiting_on_its_queue() -> bool:
        message_id = Task.objects.get(session_id=session_id, key="one").message_id
        return bool(message_id) and message_id in run_task_message_ids("cap.code_generation*")

    # The task's message reaches its queue and waits there: nobody consumes it.
    wait_until(waiting_on_its_queue, what="the task's message waiting on cap.code_generation")
    assert task_status(session_id, "one") == "queued"
    assert Agent.objects.get(pk=agent_id).status == "draining"

    assert operator.post(f"/api/v1/agents/{agent_id}/resume/").status_code == 202
    wait_until(lambda: "cap.code_generation" in (consumed_queues(worker) or set()), what="builder to consume again")
    assert wait_for_status(client, session_id, SETTLED)["status"] == "completed"
