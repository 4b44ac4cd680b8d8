from datetime import timedelta

import pytest
from celery import current_app
from django.test import override_settings
from django.utils import timezone

from agents.models import Agent
from orchestrator_project.redis_client import redis_client
from sessions.models import Session, SessionEvent
from tasks.broker import message_ids_held_by_workers
from tasks.leases import recover_lost_task
from tasks.messages import RUN_TASK, message, run_task_options
from tasks.models import Task
from tasks.release import abort_key, resend_queued_task, send_released
from tasks.sweeps import apply_retention, sweep_degraded_sessions, sweep_stuck_sessions, time_out
from tasks.tasks import mark_silent_agents_offline
from tenants.models import Tenant

from .conftest import run_task_message_ids, wait_until
from .test_execution import make_session


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
    notes = SessionEvent.objects.filter(session=running_session, from_status="running", to_status="running")
    assert [n.reason for n in notes] == ["task api waited on the queue of agent left, which is gone; sent again"]


def test_a_pinned_task_waits_for_its_agent_and_is_not_rerouted(running_session):
    Agent.objects.create(name="gpu-box", executor="scripted", capabilities=["code_generation"], status="offline")
    running_session.tasks.update(pinned_agent="gpu-box", dispatched_to="agent.gpu-box")

    assert sweep_degraded_sessions()["rerouted"] == 0
    assert running_session.tasks.get().dispatched_to == "agent.gpu-box"


# The stuck-session sweep, the silent-agent sweep and the retention policy.


def late(session: Session, seconds: float = 60) -> Session:
    Session.objects.filter(pk=session.pk).update(deadline=timezone.now() - timedelta(seconds=seconds))
    return Session.objects.get(pk=session.pk)


def test_a_running_session_past_its_deadline_times_out_and_its_open_work_stops(db, django_capture_on_commit_callbacks):
    session = make_session({"a": [], "b": ["a"]})
    Task.objects.filter(session=session, key="a").update(status="running", attempts=1)
    late(session)

    with django_capture_on_commit_callbacks(execute=True):
        assert sweep_stuck_sessions()["timed_out"] == 1
        assert sweep_stuck_sessions()["timed_out"] == 0  # a second Beat changes nothing

    event = SessionEvent.objects.get(session=session)
    assert (event.from_status, event.to_status, event.actor) == ("running", "timeout", "beat")
    assert "deadline" in event.reason and "passed" in event.reason
    assert Task.objects.get(session=session, key="b").status == "cancelled"
    running = Task.objects.get(session=session, key="a")
    assert redis_client().get(abort_key(running.pk, 1)) is not None  # its executor is told to abort


def test_a_queued_session_past_its_deadline_fails_since_queued_cannot_time_out(db):
    session = late(make_session({"a": []}, status="queued"))

    sweep_stuck_sessions()

    event = SessionEvent.objects.get(session=session)
    assert (event.from_status, event.to_status) == ("queued", "failed")
    assert event.reason.endswith("before any task started")


def test_the_deadline_does_not_run_while_the_session_is_paused(db):
    session = make_session({"a": []}, status="queued")
    session.transition("paused", reason="pause")
    deadline = Session.objects.get(pk=session.pk).deadline
    SessionEvent.objects.filter(session=session).update(created_at=timezone.now() - timedelta(minutes=10))
    Session.objects.filter(pk=session.pk).update(deadline=timezone.now() + timedelta(minutes=1))

    session.transition("queued", reason="resume")

    shifted = Session.objects.get(pk=session.pk).deadline - timezone.now()
    assert timedelta(minutes=10) < shifted < timedelta(minutes=12), (deadline, shifted)


def send_for_real(session: Session, key: str) -> None:
    """The task's message on its queue, sent as the database sends a released task."""
    task = session.tasks.get(key=key)
    Task.objects.filter(pk=task.pk).update(status="queued", via_canvas=False)
    send_released([task.pk])


def queue_lost(session: Session, key: str, *, ago_s: float = 60, message_id: str = "lost") -> Task:
    Task.objects.filter(session=session, key=key).update(
        status="queued", queued_at=timezone.now() - timedelta(seconds=ago_s), message_id=message_id
    )
    return Task.objects.get(session=session, key=key)


def test_a_queued_task_the_broker_lost_is_sent_again_once_and_the_session_says_why(
    db, django_capture_on_commit_callbacks
):
    session = make_session({"a": [], "b": ["a"]})
    Task.objects.filter(session=session).update(via_canvas=True)
    task = queue_lost(session, "a")

    with django_capture_on_commit_callbacks(execute=True):
        assert sweep_stuck_sessions()["resent"] == 1
        assert sweep_stuck_sessions()["resent"] == 0  # the new message is on its queue now

    task.refresh_from_db()
    assert run_task_message_ids() == [task.message_id] and task.message_id.startswith(str(task.pk))
    # The chain that would have sent b waited behind the lost message: both leave the canvas.
    assert not Task.objects.filter(session=session, via_canvas=True).exists()
    note = SessionEvent.objects.get(session=session)
    assert (note.from_status, note.to_status, note.actor) == ("running", "running", "beat")
    assert "no longer held the messages of 1 queued task(s) (a)" in note.reason


def test_no_message_is_sent_again_while_its_queue_has_messages_waiting(db, django_capture_on_commit_callbacks):
    session = make_session({"a": [], "b": [], "c": []})
    with django_capture_on_commit_callbacks(execute=True):
        send_for_real(session, "a")
    waiting = queue_lost(session, "a", message_id=session.tasks.get(key="a").message_id)
    # b's message is lost, but it might be behind a's on the same queue until that drains.
    queue_lost(session, "b")
    queue_lost(session, "c", ago_s=0.5)  # queued moments ago: its message may still be on the way

    assert sweep_stuck_sessions()["resent"] == 0

    assert run_task_message_ids() == [waiting.message_id]
    assert not SessionEvent.objects.filter(session=session).exists()


@override_settings(SWEEP_BATCH=2)
def test_a_long_wait_on_one_queue_does_not_hide_a_lost_message_on_another(db, django_capture_on_commit_callbacks):
    waiting = make_session({"a": [], "b": [], "c": []})
    with django_capture_on_commit_callbacks(execute=True):
        send_for_real(waiting, "a")
    # The oldest queued tasks, more than a batch, on a queue with messages waiting (a backlog).
    for key in "abc":
        queue_lost(waiting, key, ago_s=300, message_id=waiting.tasks.get(key=key).message_id or f"waits.{key}")
    waiting.tasks.update(dispatched_to="cap.code_generation")
    lost = make_session({"x": []})
    lost.tasks.update(capability="testing", dispatched_to="cap.testing")
    queue_lost(lost, "x")

    with django_capture_on_commit_callbacks(execute=True):
        assert sweep_stuck_sessions()["resent"] == 1

    assert lost.tasks.get().message_id in run_task_message_ids("cap.testing*")
    assert run_task_message_ids("cap.code_generation*") == [waiting.tasks.get(key="a").message_id]


def test_a_message_taken_by_a_consumer_that_is_no_live_worker_is_sent_again(db, django_capture_on_commit_callbacks):
    session = make_session({"a": []})
    with django_capture_on_commit_callbacks(execute=True):
        send_for_real(session, "a")
    task = queue_lost(session, "a", message_id=session.tasks.get().message_id)
    with current_app.connection_for_read() as conn:  # taken, never acked, by no worker that answers
        assert conn.default_channel.basic_get("cap.code_generation", no_ack=False) is not None

        with django_capture_on_commit_callbacks(execute=True):
            assert sweep_stuck_sessions()["resent"] == 1

        task.refresh_from_db()
        assert run_task_message_ids() == [task.message_id]


@pytest.mark.e2e
@pytest.mark.every_broker
def test_a_message_a_live_worker_holds_is_not_sent_again(stack):
    stack.agent("holder", ["code_generation"], concurrency=1)
    session = make_session({"a": []})
    task = session.tasks.get()
    options = run_task_options(task, queue="cap.code_generation")
    Task.objects.filter(pk=task.pk).update(message_id=options["task_id"], dispatched_to=options["queue"])
    queue_lost(session, "a", message_id=options["task_id"])
    message(RUN_TASK).apply_async(countdown=60, **options)  # a retry's countdown: the worker holds it
    with current_app.connection_for_write() as conn:
        wait_until(lambda: message_ids_held_by_workers(conn, [options["task_id"]]), what="the worker holding it")

    assert sweep_stuck_sessions()["resent"] == 0

    assert Task.objects.get(pk=task.pk).message_id == options["task_id"]
    assert not SessionEvent.objects.filter(session=session).exists()


def test_a_session_whose_tasks_all_finished_but_never_settled_is_settled(db):
    session = make_session({"a": [], "b": ["a"]})
    Task.objects.filter(session=session).update(status="completed")

    assert sweep_stuck_sessions()["settled"] == 1
    assert Session.objects.get(pk=session.pk).status == "completed"


def test_a_queued_session_whose_task_runs_is_marked_running(db):
    session = make_session({"a": []}, status="queued")
    Task.objects.filter(session=session).update(status="running", attempts=1)

    assert sweep_stuck_sessions()["marked_running"] == 1
    event = SessionEvent.objects.get(session=session)
    assert (event.from_status, event.to_status) == ("queued", "running")


def test_a_silent_agents_running_task_is_re_queued_at_once_and_the_session_says_why(
    db, django_capture_on_commit_callbacks
):
    session = make_session({"a": []})
    silent = Agent.objects.create(
        name="gone", executor="scripted", status="busy", last_heartbeat=timezone.now() - timedelta(minutes=5)
    )
    Task.objects.filter(session=session).update(
        status="running", attempts=1, agent=silent, lease_expires_at=timezone.now() + timedelta(minutes=1)
    )

    with django_capture_on_commit_callbacks(execute=True):
        assert mark_silent_agents_offline() == {"offline": 1, "recovered": 1}
        assert mark_silent_agents_offline() == {"offline": 0, "recovered": 0}

    task = Task.objects.get(session=session)
    assert (task.status, task.attempts) == ("queued", 1)
    assert run_task_message_ids() == [task.message_id]
    note = SessionEvent.objects.get(session=session)
    assert "agent gone went silent" in note.reason and note.reason.endswith("re-queued")


@pytest.mark.parametrize("days", [30, 0])
def test_retention_deletes_sessions_settled_long_ago_with_everything_they_own(db, settings, days):
    settings.SESSION_RETENTION_DAYS = days
    old = make_session({"a": []}, status="completed")
    old.note("kept until deleted")
    recent = make_session({"a": []}, status="failed")
    long_running = make_session({"a": []}, status="running")
    Session.objects.filter(pk__in=[old.pk, long_running.pk]).update(finished_at=timezone.now() - timedelta(days=31))
    Session.objects.filter(pk=recent.pk).update(finished_at=timezone.now() - timedelta(days=1))

    deleted = apply_retention()

    kept = set(Session.objects.values_list("pk", flat=True))
    if days:
        assert deleted == 1 and kept == {recent.pk, long_running.pk}
        assert not Task.objects.filter(session_id=old.pk).exists()
        assert not SessionEvent.objects.filter(session_id=old.pk).exists()
    else:
        assert deleted == 0 and kept == {old.pk, recent.pk, long_running.pk}


def test_a_fan_in_nobody_released_after_its_upstreams_finished_is_released(db, django_capture_on_commit_callbacks):
    session = make_session({"a": [], "b": [], "join": ["a", "b"]})
    Task.objects.filter(session=session, via_canvas=True).update(via_canvas=False)
    long_ago = timezone.now() - timedelta(minutes=5)
    Task.objects.filter(session=session, key__in=["a", "b"]).update(status="completed", finished_at=long_ago)
    Task.objects.filter(session=session, key="join").update(upstream_open=0)  # RECORD did this, then died

    with django_capture_on_commit_callbacks(execute=True):
        assert sweep_stuck_sessions()["released"] == 1
        assert sweep_stuck_sessions()["released"] == 0

    join = Task.objects.get(session=session, key="join")
    assert join.status == "queued" and run_task_message_ids() == [join.message_id]
    assert "released join: their upstreams had finished" in SessionEvent.objects.get(session=session).reason


def test_a_fan_in_whose_upstream_just_finished_is_left_to_its_worker(db):
    session = make_session({"a": [], "b": [], "join": ["a", "b"]})
    Task.objects.filter(session=session, key__in=["a", "b"]).update(status="completed", finished_at=timezone.now())
    Task.objects.filter(session=session, key="join").update(upstream_open=0)

    assert sweep_stuck_sessions()["released"] == 0
    assert Task.objects.get(session=session, key="join").status == "pending"


def test_a_note_written_while_paused_does_not_shorten_the_pause(db):
    session = make_session({"a": []}, status="queued")
    session.transition("paused", reason="pause")
    SessionEvent.objects.filter(session=session).update(created_at=timezone.now() - timedelta(minutes=10))
    session.note("a lost task re-queued while paused")
    Session.objects.filter(pk=session.pk).update(deadline=timezone.now() + timedelta(minutes=1))

    session.transition("queued", reason="resume")

    assert Session.objects.get(pk=session.pk).deadline - timezone.now() > timedelta(minutes=10)


def test_a_session_retried_with_a_new_deadline_since_the_sweep_read_it_is_not_timed_out(db):
    session = late(make_session({"a": []}))  # the sweep read it past its deadline...
    Session.objects.filter(pk=session.pk).update(deadline=timezone.now() + timedelta(hours=1))  # ...then a retry

    assert time_out(session) is False
    assert Session.objects.get(pk=session.pk).status == "running"


def test_a_lost_task_out_of_attempts_in_a_paused_session_fails_and_lets_its_dependents_go_on(
    db, django_capture_on_commit_callbacks
):
    session = make_session({"a": [], "b": ["a"]}, status="paused", optional=("a",))
    Task.objects.filter(session=session, key="a").update(status="running", attempts=3)
    task = Task.objects.select_related("session").get(session=session, key="a")

    with django_capture_on_commit_callbacks(execute=True):
        assert recover_lost_task(task, "its worker died") == "failed"

    assert Session.objects.get(pk=session.pk).status == "paused"
    b = Task.objects.get(session=session, key="b")
    assert (b.status, b.upstream_open) == ("queued", 0)  # an optional upstream's failure blocks nothing
    note = SessionEvent.objects.get(session=session)
    assert (note.from_status, note.to_status) == ("paused", "paused") and note.reason.endswith("; failed")


def test_a_stranded_task_is_sent_again_once_by_two_sweeps_that_read_it_together(db, django_capture_on_commit_callbacks):
    session = make_session({"a": []})
    Task.objects.filter(session=session).update(status="queued", dispatched_to="agent.gone", message_id="old")
    first, second = (Task.objects.select_related("session").get(session=session) for _ in range(2))

    with django_capture_on_commit_callbacks(execute=True):
        assert resend_queued_task(first, dispatched_to="") is True
        assert resend_queued_task(second, dispatched_to="") is False

    assert len(run_task_message_ids()) == 1
