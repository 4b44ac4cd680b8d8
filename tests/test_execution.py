"""The task hand-offs of the engine (tasks/running.py, tasks/release.py) on the real database, in-process."""

import os
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import F
from django.utils import timezone

from agents.executors import TransientError
from agents.models import Agent
from agents.runtime import AgentRuntime
from orchestrator_project import metrics
from sessions.models import ACTIVE, Session
from tasks import statements
from tasks import tasks as celery_tasks
from tasks.leases import reap_expired_leases
from tasks.lifecycle import mark_session_running, retry_session, settle_session
from tasks.messages import new_message_id, task_of_message
from tasks.models import Task
from tasks.release import release_dependents, release_ready_tasks
from tasks.running import RetryTask, claim_task, execute_task, record_outcome, take_task
from tasks.tasks import run_task
from tenants.models import Tenant
from tests.conftest import queued_broker_messages

TS = Task.Status


def make_session(edges: dict[str, list[str]], *, status: str = "running", optional=()) -> Session:
    tenant, _ = Tenant.objects.get_or_create(slug="acme", defaults={"name": "Acme"})
    session = Session.objects.create(tenant=tenant, title="t", requirements="r", status=status)
    tasks = {
        key: Task.objects.create(
            session=session, key=key, title=key, capability="code_generation", position=i, required=key not in optional
        )
        for i, key in enumerate(edges)
    }
    for key, deps in edges.items():
        tasks[key].depends_on.set([tasks[d] for d in deps])
    for key, deps in edges.items():
        Task.objects.filter(pk=tasks[key].pk).update(upstream_open=len(deps))
    return session


def finish(session: Session, key: str, status: str) -> None:
    """What statements.RECORD leaves behind when a worker dies right after it: the outcome, and
    one upstream fewer for each pending dependent. Nothing is released yet."""
    task = session.tasks.get(key=key)
    Task.objects.filter(pk=task.pk).update(status=status)
    Task.objects.filter(depends_on=task, status=TS.PENDING).update(upstream_open=F("upstream_open") - 1)


def runtime(executor=None) -> AgentRuntime:
    agent, _ = Agent.objects.get_or_create(name="builder", defaults={"executor": "scripted", "status": "online"})
    result = AgentRuntime(agent.pk, agent.name, "scripted", {})
    if executor is not None:
        result._executor = executor
    return result


def statuses(session: Session) -> dict[str, str]:
    return dict(session.tasks.values_list("key", "status"))


def test_release_queues_roots_and_waits_for_upstreams(db):
    session = make_session({"a": [], "b": ["a"], "c": []})

    release_ready_tasks(session.pk)

    assert statuses(session) == {"a": "queued", "b": "pending", "c": "queued"}


def test_a_failed_required_task_skips_every_descendant(db):
    session = make_session({"a": [], "b": ["a"], "c": ["b"], "d": []})
    session.tasks.filter(key="a").update(status=TS.FAILED)

    release_ready_tasks(session.pk)

    assert statuses(session) == {"a": "failed", "b": "skipped", "c": "skipped", "d": "queued"}
    assert "upstream a failed" in session.tasks.get(key="b").error


def test_a_failed_optional_task_does_not_block_its_dependents(db):
    session = make_session({"a": [], "b": ["a"]}, optional={"a"})
    session.tasks.filter(key="a").update(status=TS.FAILED)

    release_ready_tasks(session.pk)

    assert statuses(session)["b"] == "queued"


@pytest.mark.parametrize(
    ("final", "optional", "outcome"),
    [
        ({"a": "completed", "b": "completed"}, (), "completed"),
        ({"a": "completed", "b": "failed"}, ("b",), "partially_completed"),
        ({"a": "completed", "b": "skipped"}, ("b",), "partially_completed"),
        ({"a": "failed", "b": "completed"}, ("b",), "failed"),
        ({"a": "cancelled", "b": "completed"}, (), "failed"),
    ],
)
def test_settle_session_outcomes(db, final, optional, outcome):
    session = make_session({"a": [], "b": []}, optional=optional)
    for key, status in final.items():
        session.tasks.filter(key=key).update(status=status)

    assert settle_session(session.pk) == outcome

    row = Session.objects.get(pk=session.pk)
    assert row.status == outcome
    assert row.result["task_counts"]["completed"] == list(final.values()).count("completed")


def test_settle_session_waits_while_anything_can_still_run(db):
    session = make_session({"a": [], "b": []})
    session.tasks.filter(key="a").update(status=TS.COMPLETED)
    session.tasks.filter(key="b").update(status=TS.RUNNING)

    assert settle_session(session.pk) is None
    assert Session.objects.get(pk=session.pk).status == "running"


def test_racing_claims_give_the_task_to_exactly_one_worker(transactional_db):
    session = make_session({"a": []})
    session.tasks.update(status=TS.QUEUED)
    task = session.tasks.get()
    agent_runtime = runtime()
    barrier = threading.Barrier(8)
    wins = []

    def claim():
        try:
            barrier.wait()
            attempt = claim_task(Task.objects.get(pk=task.pk), agent_runtime)
            if attempt is not None:
                wins.append(attempt)
        finally:
            connection.close()

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert wins == [1]
    task.refresh_from_db()
    assert (task.status, task.attempts, task.agent_id) == ("running", 1, agent_runtime.agent_id)


def test_a_paused_session_starts_nothing(db):
    session = make_session({"a": []}, status="paused")
    session.tasks.update(status=TS.QUEUED)

    assert execute_task(task_id=session.tasks.get().pk, runtime=runtime()) == "session paused"
    assert statuses(session) == {"a": "queued"}


class FlakyExecutor:
    kind = "flaky"

    def __init__(self, failures: int):
        self.failures = failures

    def execute(self, ctx):
        if ctx.attempt <= self.failures:
            raise TransientError(f"tool busy on attempt {ctx.attempt}")
        return {"output": "ok"}


def test_a_transient_error_requeues_with_backoff_then_succeeds(db):
    session = make_session({"a": []})
    session.tasks.update(status=TS.QUEUED)
    task_id = session.tasks.get().pk
    flaky = runtime(FlakyExecutor(failures=2))

    backoffs = []
    for _ in range(2):
        with pytest.raises(RetryTask) as retry:
            execute_task(task_id=task_id, runtime=flaky)
        backoffs.append(retry.value.countdown)
        assert statuses(session) == {"a": "queued"}
    assert execute_task(task_id=task_id, runtime=flaky) == "completed"

    assert backoffs == [2.0, 4.0]
    assert session.tasks.get().attempts == 3


def test_transient_errors_fail_the_task_after_max_attempts(db):
    session = make_session({"a": []})
    session.tasks.update(status=TS.QUEUED, max_attempts=2)
    task_id = session.tasks.get().pk
    flaky = runtime(FlakyExecutor(failures=5))

    with pytest.raises(RetryTask):
        execute_task(task_id=task_id, runtime=flaky)
    assert execute_task(task_id=task_id, runtime=flaky) == "failed"

    task = session.tasks.get()
    assert task.status == "failed" and "gave up after 2 attempts" in task.error


def test_a_message_for_a_task_whose_upstream_runs_asks_to_be_redelivered(db):
    session = make_session({"a": [], "b": ["a"]})
    session.tasks.filter(key="a").update(status=TS.RUNNING)

    with pytest.raises(RetryTask):
        execute_task(task_id=session.tasks.get(key="b").pk, runtime=runtime())

    assert statuses(session)["b"] == "pending"


def test_a_fan_in_counts_every_upstream_whichever_finishes_last(db):
    session = make_session({"a": [], "b": [], "c": [], "d": ["a", "b", "c"]})
    finish(session, "a", TS.FAILED)
    finish(session, "b", TS.COMPLETED)
    finish(session, "c", TS.COMPLETED)

    release_dependents(session.tasks.get(key="c"))

    assert statuses(session)["d"] == "skipped"


def test_a_fan_in_is_queued_only_when_its_last_upstream_completes(db):
    session = make_session({"a": [], "b": [], "d": ["a", "b"]})
    finish(session, "a", TS.COMPLETED)
    session.tasks.filter(key="b").update(status=TS.RUNNING)

    release_dependents(session.tasks.get(key="a"))
    assert statuses(session)["d"] == "pending"

    finish(session, "b", TS.COMPLETED)
    release_dependents(session.tasks.get(key="b"))
    assert statuses(session)["d"] == "queued"


def test_a_skip_passes_through_an_optional_task(db):
    session = make_session({"build": [], "lint": ["build"], "deploy": ["lint"]}, optional={"lint"})
    session.tasks.filter(key="build").update(status=TS.FAILED)

    release_ready_tasks(session.pk)

    assert statuses(session) == {"build": "failed", "lint": "skipped", "deploy": "skipped"}


def test_a_redelivered_message_of_a_finished_task_releases_what_a_crash_left_pending(db):
    session = make_session({"a": [], "b": ["a"]})
    finish(session, "a", TS.COMPLETED)  # recorded, then the worker died

    assert execute_task(task_id=session.tasks.get(key="a").pk, runtime=runtime()) == "taken"

    assert statuses(session)["b"] == "queued"


def test_retry_takes_over_a_run_left_over_from_a_stop(db):
    session = make_session({"a": []}, status="stopped")
    session.tasks.update(status=TS.RUNNING, attempts=1)
    stale = Task.objects.select_related("session").get(session=session)

    retry_session(session, actor="test")
    record_outcome(stale, 1, TS.CANCELLED, error="aborted: the stopped run ends late")

    task = session.tasks.get()
    assert (task.status, task.attempts) == ("queued", 1)


def test_a_late_outcome_of_a_run_the_reaper_ended_is_refused_and_counted_once(db):
    session = make_session({"a": []}, status="cancelled")
    session.tasks.update(status=TS.RUNNING, attempts=1, lease_expires_at=timezone.now() - timedelta(seconds=1))
    late = Task.objects.select_related("session").get(session=session)
    finished = metrics.TASKS_FINISHED.labels(late.capability, "none", TS.CANCELLED, "user")
    refused = metrics.FENCING_REJECTIONS.labels("task", "record")
    before = (finished._value.get(), refused._value.get())

    assert reap_expired_leases()["cancelled"] == 1
    # The run hears the abort and records the same outcome under the same attempt, too late.
    assert record_outcome(late, 1, TS.CANCELLED, error="aborted: the run ends late") is False

    assert (finished._value.get(), refused._value.get()) == (before[0] + 1, before[1] + 1)
    assert session.tasks.get().error.startswith("the lease of attempt 1")


@pytest.mark.parametrize("prepared", [True, False])
def test_the_hot_path_runs_with_and_without_prepared_statements(db, settings, prepared):
    settings.DB_PREPARED_STATEMENTS = prepared  # off behind a transaction-mode pooler
    session = make_session({"a": [], "b": ["a"]})
    release_ready_tasks(session.pk)

    assert execute_task(task_id=session.tasks.get(key="a").pk, runtime=runtime()) == "completed"
    assert statuses(session) == {"a": "completed", "b": "queued"}
    assert execute_task(task_id=session.tasks.get(key="b").pk, runtime=runtime()) == "completed"


def test_two_upstreams_finishing_at_once_queue_their_fan_in_exactly_once(transactional_db):
    session = make_session({"a": [], "b": [], "c": ["a", "b"]})
    release_ready_tasks(session.pk)
    agent_runtime = runtime()
    barrier = threading.Barrier(2)
    outcomes = []

    def run(key: str) -> None:
        try:
            barrier.wait()
            outcomes.append(execute_task(task_id=session.tasks.get(key=key).pk, runtime=agent_runtime))
        finally:
            connection.close()

    for _ in range(20):  # each round races the two records again
        threads = [threading.Thread(target=run, args=(key,)) for key in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        c = session.tasks.get(key="c")
        assert (c.status, c.upstream_open) == ("queued", 0)
        session.tasks.update(status=TS.QUEUED, attempts=0, upstream_open=0)
        session.tasks.filter(key="c").update(status=TS.PENDING, upstream_open=2)

    assert outcomes == ["completed"] * 40


def test_a_redelivered_outcome_lowers_the_dependents_count_only_once(db):
    session = make_session({"a": [], "b": ["a"], "c": ["a", "b"]})
    release_ready_tasks(session.pk)
    a = session.tasks.get(key="a")
    assert execute_task(task_id=a.pk, runtime=runtime()) == "completed"

    # The same message again (a redelivery): the task is finished, nothing is counted twice.
    assert execute_task(task_id=a.pk, runtime=runtime()) == "taken"

    assert dict(session.tasks.values_list("key", "upstream_open")) == {"a": 0, "b": 0, "c": 1}
    assert statuses(session) == {"a": "completed", "b": "queued", "c": "pending"}


def test_a_record_whose_reply_was_lost_is_settled_from_the_row(db):
    session = make_session({"a": [], "b": [], "c": ["a", "b"]})
    release_ready_tasks(session.pk)
    finish(session, "b", TS.COMPLETED)
    a, attempt = take_task(session.tasks.get(key="a").pk, runtime(), routing_settled=True)
    # The statement commits, but its reply never arrives; statements.run sends it again.
    recorded = {"task": a.pk, "attempt": attempt, "status": TS.COMPLETED, "result": "{}", "error": ""}
    statements.run(statements.RECORD, recorded)

    record_outcome(a, attempt, TS.COMPLETED)

    assert statuses(session) == {"a": "completed", "b": "completed", "c": "queued"}


def test_the_claim_statement_knows_the_active_session_statuses():
    import re

    inline = re.search(r"t\.session_status IN \(([^)]*)\)", statements.TAKE).group(1)
    assert {s.strip(" '") for s in inline.split(",")} == set(ACTIVE)


def test_a_statement_that_loses_its_connection_runs_again_on_a_new_one(transactional_db, caplog):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [(pid,)] = cursor.fetchall()
    # Another session ends ours, as a database restart would.
    killer = __import__("psycopg").connect(
        f"dbname={connection.settings_dict['NAME']} host=127.0.0.1 user=postgres", autocommit=True
    )
    killer.execute("SELECT pg_terminate_backend(%s)", [pid])
    killer.close()

    assert statements.run("SELECT 42", []) == [(42,)]
    assert "hot-path statement failed" in caplog.text


def test_a_run_task_message_names_its_task_in_its_id(db):
    session = make_session({"a": []})
    task = session.tasks.get()
    first, second = new_message_id(task), new_message_id(task)

    assert first != second  # a new id per dispatch: revoking one never drops a later one
    assert task_of_message(first) == task.pk == task_of_message(second)


@pytest.mark.parametrize("message_id", ["not-a-task", "123", "a.b.c"])
def test_a_run_task_message_whose_id_names_no_task_is_dropped(db, message_id, caplog):
    # Before any agent or database work: the message is logged and acknowledged, not retried.
    assert run_task.apply(task_id=message_id).get() == "gone"
    assert f"run_task message {message_id} names no task" in caplog.text


def test_run_task_retries_without_a_limit():
    # self.retry(max_retries=None) falls back to the task's own limit (Celery's default is 3):
    # past it, the message would be dropped with MaxRetriesExceededError and the task left
    # queued. (An eager apply() cannot show it: it runs each retry at once, recursively.)
    assert run_task.max_retries is None


def test_the_first_claim_moves_a_queued_session_to_running_once(db):
    session = make_session({"a": [], "b": []}, status="queued")

    assert mark_session_running(session.pk, "a", "builder") is True
    assert mark_session_running(session.pk, "b", "builder") is False  # a later claim changes nothing

    events = list(session.events.values_list("to_status", "reason", "actor"))
    assert events == [("running", "task a claimed by builder", "agent:builder")]


@pytest.mark.parametrize("status", ["paused", "completed", "cancelled"])
def test_a_claim_noted_after_the_session_moved_on_changes_nothing(db, status):
    session = make_session({"a": []}, status=status)

    assert mark_session_running(session.pk, "a", "builder") is False
    assert mark_session_running("00000000-0000-0000-0000-000000000000", "a", "builder") is False  # deleted
    assert Session.objects.get(pk=session.pk).status == status
    assert not session.events.exists()


def test_the_claims_of_a_queued_session_ask_the_orchestrator_to_mark_it_running_once(db):
    session = make_session({"a": [], "b": [], "c": []}, status="queued")
    session.tasks.update(status=TS.QUEUED)
    agent_runtime = runtime()

    for task in session.tasks.all():
        assert execute_task(task_id=task.pk, runtime=agent_runtime) == "completed"

    notes = [m for m in queued_broker_messages() if m["headers"]["task"] == "tasks.mark_session_running"]
    assert len(notes) == 1
    assert Session.objects.get(pk=session.pk).status == "queued"  # until the orchestrator runs it


def test_a_claim_this_process_lost_track_of_runs_again_under_the_same_attempt(db):
    # TAKE committed but its reply was lost (or recording failed): the task is running on this
    # very process, which is not running it; its lease would be renewed as long as it lives.
    session = make_session({"a": []})
    this_agent = runtime()
    Task.objects.filter(session=session).update(
        status="running", attempts=1, agent_id=this_agent.agent_id, worker_pid=os.getpid()
    )

    assert execute_task(task_id=session.tasks.get().pk, runtime=this_agent) == "completed"
    assert session.tasks.get().attempts == 1


def test_a_task_running_in_another_process_is_left_alone(db):
    session = make_session({"a": []})
    this_agent = runtime()
    Task.objects.filter(session=session).update(
        status="running", attempts=1, agent_id=this_agent.agent_id, worker_pid=1
    )

    assert execute_task(task_id=session.tasks.get().pk, runtime=this_agent) == "taken"
    assert session.tasks.get().status == "running"


def test_a_broker_away_when_the_first_claim_is_noted_does_not_stop_the_task(db, monkeypatch):
    from kombu.exceptions import OperationalError as BrokerError

    def broker_away(*args, **kwargs):
        raise BrokerError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(celery_tasks.mark_session_running, "apply_async", broker_away)
    session = make_session({"a": []}, status="queued")
    session.tasks.update(status=TS.QUEUED)

    assert execute_task(task_id=session.tasks.get().pk, runtime=runtime()) == "completed"


class UnstorableResultExecutor:
    """An executor bug the engine does not catch where it runs the executor: a result that JSON
    cannot encode fails only when the outcome is recorded, after the claim."""

    kind = "unstorable"

    def execute(self, ctx):
        return {"output": object()}


def test_an_error_that_escapes_after_the_claim_ends_its_lease_for_the_reaper(db):
    session = make_session({"a": []})
    session.tasks.update(status=TS.QUEUED)

    with pytest.raises(TypeError, match="not JSON serializable"):
        execute_task(task_id=session.tasks.get().pk, runtime=runtime(UnstorableResultExecutor()))

    task = session.tasks.get()
    assert (task.status, task.worker_pid) == (TS.RUNNING, None)  # no process holds it any more
    assert task.lease_expires_at <= timezone.now()
    assert reap_expired_leases()["requeued"] == 1
    assert session.tasks.get().status == TS.QUEUED
