"""R6: the same task message delivered twice at once runs the task once."""

import pytest

from agents.executors.scripted import side_effects_of
from agents.models import Agent
from orchestrator_project.celery import app
from sessions.models import Session
from tasks.broker import message_ids_held_by_workers, queues_with_messages
from tasks.messages import new_message_id
from tasks.models import Task
from tasks.tasks import run_task
from tests.conftest import ALL_BUILD, chain_payload, member_client, task_status, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.every_broker]


def test_the_same_task_message_delivered_twice_at_once_runs_once(stack):
    stack.agent("builder", ALL_BUILD, concurrency=2)  # two pool processes take both copies at once
    payload = chain_payload(0.5)
    payload["tasks"] = payload["tasks"][:1]
    payload["tasks"][0]["params"]["count_side_effect"] = True
    created = member_client("acme", "alice").post("/api/v1/sessions/", payload, format="json")
    session_id = created.json()["id"]
    task = Task.objects.get(session_id=session_id)
    Session.objects.filter(pk=session_id).update(status="running")
    Task.objects.filter(pk=task.pk).update(status="queued")

    message_id = new_message_id(task)
    for _ in range(2):
        run_task.apply_async(task_id=message_id, queue="cap.code_generation")

    wait_until(lambda: task_status(session_id, "one") == "completed", what="the task to complete")
    # Both copies consumed and acknowledged: none waits on the queue, and no worker holds one.
    with app.connection_for_write() as conn:
        wait_until(
            lambda: (
                not queues_with_messages(conn, ["cap.code_generation"])
                and not message_ids_held_by_workers(conn, [message_id])
            ),
            what="both copies consumed",
        )
    task.refresh_from_db()
    assert task.attempts == 1
    assert side_effects_of(session_id) == {"one": 1}
    # The heartbeat (every second in the tests) counts the agent's completed tasks: one.
    wait_until(lambda: Agent.objects.get(name="builder").tasks_completed == 1, what="a heartbeat to count the run")
