"""Prometheus metrics: /metrics and its scrape token, the state read from the database at scrape
time, and the worker groups' own servers summing every pool process (also a dead one)."""

import os
import signal
import subprocess
import sys
from datetime import timedelta

import httpx
import pytest
from django.apps import apps
from django.test import override_settings
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from prometheus_client.parser import text_string_to_metric_families

from agents.models import Agent
from orchestrator_project import metrics
from orchestrator_project.schedules import sync_schedules
from sessions.models import Session
from tasks.models import Task
from tenants.models import Tenant

from .conftest import (
    ALL_BUILD,
    ALL_QA,
    create_and_start,
    dag_payload,
    free_port,
    member_client,
    running_stack,
    wait_for_status,
    wait_until,
)


def samples(text: str, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of the samples called `name` in an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def scrape(client, **headers):
    return client.get("/metrics", REMOTE_ADDR=headers.pop("remote", "127.0.0.1"), headers=headers)


@pytest.mark.django_db
@override_settings(METRICS_TOKEN="scrape-secret")
def test_metrics_need_the_scrape_token(client):
    assert scrape(client).status_code == 403
    assert scrape(client, authorization="Bearer wrong").status_code == 403
    assert scrape(client, authorization="scrape-secret").status_code == 403
    answered = scrape(client, authorization="Bearer scrape-secret")
    assert answered.status_code == 200
    assert answered["Content-Type"].startswith("text/plain; version=")


@pytest.mark.django_db
@override_settings(METRICS_TOKEN="t", DEBUG=False, SECURE_SSL_REDIRECT=True, ALLOWED_HOSTS=["web"])
def test_in_production_prometheus_scrapes_over_plain_http_inside_the_network(client):
    # Prometheus reaches the web at http://web:8000/metrics: no redirect to HTTPS for it, as for
    # the health probes, while the API is redirected.
    answered = client.get("/metrics", HTTP_HOST="web", headers={"authorization": "Bearer t"})
    assert answered.status_code == 200
    assert client.get("/api/v1/sessions/", HTTP_HOST="web").status_code == 301


@pytest.mark.django_db
@override_settings(METRICS_TOKEN="")
def test_without_a_token_only_loopback_in_development_may_scrape(client, settings):
    settings.DEBUG = True
    assert scrape(client).status_code == 200
    assert scrape(client, remote="10.1.2.3").status_code == 403
    settings.DEBUG = False
    assert scrape(client).status_code == 403


@pytest.mark.django_db
@override_settings(METRICS_TOKEN="t")
def test_metrics_turned_off_are_not_served(client, monkeypatch, tmp_path):
    monkeypatch.setenv("METRICS_ENABLED", "false")
    monkeypatch.setenv("METRICS_DIR", str(tmp_path))
    assert scrape(client, authorization="Bearer t").status_code == 404
    assert metrics.prepare_group() is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.django_db
@override_settings(METRICS_TOKEN="t")
def test_the_database_state_is_read_at_scrape_time(client):
    tenant = Tenant.objects.create(name="Acme", slug="acme")
    running = Session.objects.create(tenant=tenant, requirements="r", status=Session.Status.RUNNING)
    Session.objects.create(tenant=tenant, requirements="r", status=Session.Status.COMPLETED)
    long_ago = timezone.now() - timedelta(seconds=120)
    for key, capability, status, queued_at in [
        ("a", "testing", Task.Status.QUEUED, long_ago),
        ("b", "testing", Task.Status.QUEUED, timezone.now()),
        ("c", "code_review", Task.Status.RUNNING, long_ago),
        ("d", "code_review", Task.Status.COMPLETED, long_ago),
    ]:
        Task.objects.create(
            session=running, key=key, title=key, capability=capability, status=status, queued_at=queued_at
        )
    Agent.objects.create(
        name="tester", capabilities=["testing"], executor="scripted", status="online", last_heartbeat=timezone.now()
    )
    Agent.objects.create(name="gone", capabilities=["testing", "code_review"], executor="scripted", status="offline")
    sync_schedules(apps)  # a test before this one may have flushed what the migrations wrote
    every_minute, _ = IntervalSchedule.objects.get_or_create(every=1, period="minutes")
    PeriodicTask.objects.create(name="an operator's own", task="reports.weekly", interval=every_minute)

    text = scrape(client, authorization="Bearer t").content.decode()

    sessions = samples(text, "orch_sessions")
    assert sessions[(("status", "running"),)] == 1
    assert (("status", "completed"),) not in sessions  # settled sessions are history, not state
    assert samples(text, "orch_queue_depth")[(("capability", "testing"),)] == 2
    assert samples(text, "orch_queue_depth")[(("capability", "code_review"),)] == 0
    assert samples(text, "orch_queue_oldest_age_seconds")[(("capability", "testing"),)] >= 120
    assert samples(text, "orch_tasks_running")[(("capability", "code_review"),)] == 1
    online = samples(text, "orch_capability_agents_online")
    assert online[(("capability", "testing"),)] == 1
    assert online[(("capability", "code_review"),)] == 0
    up = samples(text, "orch_agent_up")
    assert up[(("agent", "tester"), ("executor", "scripted"))] == 1
    assert up[(("agent", "gone"), ("executor", "scripted"))] == 0
    periods = samples(text, "orch_sweep_period_seconds")
    assert periods[(("sweep", "tasks.reap_expired_leases"),)] == 10
    assert periods[(("sweep", "sessions.apply_retention"),)] == 3600
    assert (("sweep", "reports.weekly"),) not in periods  # no sweep of ours: it records no success


def test_a_group_directory_is_fresh_and_the_dead_groups_are_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("METRICS_DIR", str(tmp_path))
    monkeypatch.setenv(metrics.ENV, os.environ.get(metrics.ENV, ""))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / str(dead.pid)).mkdir()
    (tmp_path / str(os.getppid())).mkdir()  # a live group
    (tmp_path / str(os.getpid())).mkdir()
    (tmp_path / str(os.getpid()) / "counter_1.db").write_bytes(b"old")

    group = metrics.prepare_group()

    assert group == tmp_path / str(os.getpid())
    assert os.environ[metrics.ENV] == str(group)
    assert list(group.iterdir()) == []
    assert not (tmp_path / str(dead.pid)).exists()
    assert (tmp_path / str(os.getppid())).exists()


def worker_samples(port: int, name: str) -> dict[tuple, float]:
    return samples(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text, name)


def finished_total(port: int, capability: str | None = None) -> float:
    found = worker_samples(port, "orch_tasks_finished_total")
    return sum(v for labels, v in found.items() if capability is None or ("capability", capability) in labels)


@pytest.mark.e2e
def test_worker_groups_serve_the_sum_of_their_pool_processes_even_after_one_dies(request, transactional_db):
    orchestrator_port, builder_port, reviewer_port = free_port(), free_port(), free_port()
    with running_stack(request, orchestrator_env={"METRICS_PORT": str(orchestrator_port)}) as stack:
        builder = stack.agent("builder", ALL_BUILD, concurrency=3, env={"METRICS_PORT": str(builder_port)})
        stack.agent("reviewer", ALL_QA, concurrency=3, env={"METRICS_PORT": str(reviewer_port)})
        client = member_client("acme", "alice")
        sessions = [create_and_start(client, dag_payload()) for _ in range(4)]
        for session_id in sessions:
            assert wait_for_status(client, session_id, {"completed", "failed"})["status"] == "completed"
        # 4 sessions x (design, api, ui) on the builder, x (tests, review, docs) on the reviewer.
        wait_until(lambda: finished_total(builder_port) == 12, what="the builder to count 12 tasks")
        assert finished_total(reviewer_port) == 12
        completed = worker_samples(builder_port, "orch_tasks_finished_total")
        labels = (
            ("capability", "code_generation"),
            ("cause", "none"),
            ("executor", "scripted"),
            ("outcome", "completed"),
        )
        assert completed[labels] == 8
        waited = worker_samples(builder_port, "orch_task_schedule_to_start_seconds_count")
        assert sum(waited.values()) == 12
        transitions = worker_samples(orchestrator_port, "orch_session_transitions_total")
        assert transitions.get((("from_status", "running"), ("to_status", "completed"))) == 4, transitions

        # A pool process dies: the worker replaces it, and what it counted still counts.
        pool = [int(pid) for pid in subprocess.check_output(["pgrep", "-P", str(builder.pid)]).split()]
        os.kill(pool[0], signal.SIGKILL)

        def replaced() -> bool:
            now = [int(pid) for pid in subprocess.check_output(["pgrep", "-P", str(builder.pid)]).split()]
            return len(now) == 3 and pool[0] not in now

        wait_until(replaced, what="the builder to replace its pool process")
        assert finished_total(builder_port) == 12
        more = create_and_start(client, dag_payload())
        assert wait_for_status(client, more, {"completed", "failed"})["status"] == "completed"
        wait_until(lambda: finished_total(builder_port) == 15, what="the builder to count 15 tasks")
