"""Task leases: renewal for live claiming processes, and Beat's reaper for the rest."""

import os
import signal
from datetime import timedelta

import pytest
from django.utils import timezone

from agents.models import Agent
from orchestrator_project.redis_client import redis_client
from sessions.models import Session, SessionEvent
from tasks.fleet import record_heartbeat
from tasks.leases import reap_expired_leases, renew_leases
from tasks.models import Task
from tasks.release import abort_key

from .conftest import (
    chain_payload,
    create_and_start,
    member_client,
    queued_broker_messages,
    wait_for_status,
    wait_until,
)
from .test_execution import make_session

TS = Task.Status
PID = 424242  # a worker process id; nothing here signals it


def agent(name: str = "builder", *, processes=(PID,), beat_ago_s: float = 0, status: str = "online") -> Agent:
    beat = timezone.now() - timedelta(seconds=beat_ago_s)
    row, _ = Agent.objects.update_or_create(
        name=name,
        defaults={"executor": "scripted", "status": status, "processes": list(processes), "last_heartbeat": beat},
    )
    return row


def claimed(session: Session, key: str, by: Agent, *, lease_s: float, pid: int = PID, attempts: int = 1) -> Task:
    """The task as TAKE leaves it: running on `by`'s process `pid`, its lease ending in `lease_s`."""
    Task.objects.filter(session=session, key=key).update(
        status=TS.RUNNING,
        agent=by,
        worker_pid=pid,
        attempts=attempts,
        started_at=timezone.now(),
        lease_expires_at=timezone.now() + timedelta(seconds=lease_s),
    )
    return session.tasks.get(key=key)


def run_task_messages() -> list[dict]:
    return queued_broker_messages("cap.*")


def test_a_live_claiming_process_keeps_its_lease_and_others_do_not(db, settings):
    settings.TASK_LEASE_SECONDS = 60
    session = make_session({"a": [], "b": [], "c": []})
    live, silent = agent("builder"), agent("gone", beat_ago_s=3600)
    kept = claimed(session, "a", live, lease_s=1)
    dead_process = claimed(session, "b", live, lease_s=1, pid=PID + 1)
    dead_agent = claimed(session, "c", silent, lease_s=1)

    assert renew_leases() == 1

    def lease(task: Task) -> float:
        return (Task.objects.get(pk=task.pk).lease_expires_at - timezone.now()).total_seconds()

    assert lease(kept) > 50
    assert lease(dead_process) < 2 and lease(dead_agent) < 2


def test_a_heartbeat_names_its_processes_and_renews_their_tasks(db, settings):
    settings.TASK_LEASE_SECONDS = 60
    session = make_session({"a": []})
    row = agent("builder", processes=())
    task = claimed(session, "a", row, lease_s=1)

    record_heartbeat(row, processes=[PID])

    assert Agent.objects.get(pk=row.pk).processes == [PID]
    assert Task.objects.get(pk=task.pk).lease_expires_at > timezone.now() + timedelta(seconds=50)


def test_an_expired_lease_re_queues_the_task_says_why_and_sends_it_again_once(db, django_capture_on_commit_callbacks):
    session = make_session({"a": [], "b": ["a"]})
    Task.objects.update(via_canvas=True)
    task = claimed(session, "a", agent("builder", processes=()), lease_s=-1)

    with django_capture_on_commit_callbacks(execute=True):  # the message goes out after commit
        assert reap_expired_leases() == {"requeued": 1, "orphaned": 0, "cancelled": 0}
        assert reap_expired_leases() == {"requeued": 0, "orphaned": 0, "cancelled": 0}  # a second Beat

    row = Task.objects.get(pk=task.pk)
    assert (row.status, row.attempts, row.worker_pid) == (TS.QUEUED, 1, None)  # the next claim is attempt 2
    assert "lease of attempt 1 on agent builder expired" in row.error
    # Its canvas message is gone: it and what follows are released from the database now.
    assert not Task.objects.filter(session=session, via_canvas=True).exists()
    sent = [m for m in run_task_messages() if m["headers"]["task"] == "tasks.run_task"]
    assert [m["headers"]["id"].split(".")[0] for m in sent] == [str(task.pk)]
    [note] = SessionEvent.objects.filter(session=session)
    assert (note.from_status, note.to_status, note.actor) == ("running", "running", "beat")
    assert note.reason.startswith("task a: the lease of attempt 1")
    # The lost run, should it still go on somewhere, is asked to stop; the next attempt is not.
    assert redis_client().get(abort_key(task.pk, 1)).startswith(b"attempt 1 was taken back")
    assert not redis_client().exists(abort_key(task.pk, 2))


def test_a_lost_task_with_no_attempts_left_fails_and_orphans_its_session(db):
    session = make_session({"a": [], "b": ["a"]})
    task = claimed(session, "a", agent("builder", processes=()), lease_s=-1, attempts=3)

    assert reap_expired_leases()["orphaned"] == 1

    row = Task.objects.get(pk=task.pk)
    assert row.status == TS.FAILED and row.error.startswith("gave up after 3 attempts")
    session.refresh_from_db()
    assert session.status == Session.Status.ORPHANED
    event = SessionEvent.objects.get(session=session)
    assert (event.from_status, event.to_status) == ("running", "orphaned")
    assert "its 3 attempts are used up" in event.reason


def test_a_lost_task_of_a_stopped_session_is_cancelled_not_re_run(db):
    session = make_session({"a": []}, status="stopped")
    task = claimed(session, "a", agent("builder", processes=()), lease_s=-1)

    assert reap_expired_leases()["cancelled"] == 1
    assert Task.objects.get(pk=task.pk).status == TS.CANCELLED
    assert run_task_messages() == []


def test_a_task_whose_process_lives_is_not_reaped_even_with_a_lapsed_lease(db):
    session = make_session({"a": []})
    task = claimed(session, "a", agent("builder"), lease_s=-1)  # the agent lists PID

    assert reap_expired_leases()["requeued"] == 0
    assert Task.objects.get(pk=task.pk).status == TS.RUNNING


@pytest.mark.e2e
def test_a_worker_process_killed_mid_task_is_recovered_and_the_session_completes(stack):
    stack.agent("builder", ["system_design", "code_generation", "testing"], concurrency=2)
    client = member_client("acme", "alice")
    payload = chain_payload(3.0)
    payload["tasks"] = payload["tasks"][:1]
    session_id = create_and_start(client, payload)
    wait_until(lambda: Task.objects.filter(session_id=session_id, status=TS.RUNNING).exists(), what="the task to run")
    task = Task.objects.get(session_id=session_id)

    os.kill(task.worker_pid, signal.SIGKILL)  # the pool process dies mid-task; its agent lives on

    def recovered() -> bool:
        reap_expired_leases()  # Beat's sweep, run here every half second
        return Session.objects.get(pk=session_id).status == "completed"

    wait_until(recovered, timeout=60, interval=0.5, what="the session to complete after the kill")
    task.refresh_from_db()
    assert (task.status, task.attempts) == (TS.COMPLETED, 2)
    assert SessionEvent.objects.filter(session_id=session_id, reason__contains="lease of attempt 1").count() == 1
    assert wait_for_status(client, session_id, {"completed"})["task_counts"]["completed"] == 1
