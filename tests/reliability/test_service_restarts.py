"""R3 and R4: the services under the stack restart while ten sessions run.

R3 restarts the broker: Redis with its data gone (queued messages, chord counters, locks, the Beat
leader's lock): the sweeper sends again what the broker lost and every session completes; or,
with TEST_BROKER_URL, RabbitMQ (the messages survive it). R4 restarts PostgreSQL: the workers
reconnect and every session completes.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from django.conf import settings
from django.db import connections

from orchestrator_project.redis_client import redis_client
from scripts.ensure_services import rabbitmq_answers, redis_answers
from sessions.models import Session, SessionEvent
from tasks.models import Task
from tests.conftest import (
    ALL_BUILD,
    ALL_QA,
    ROOT,
    chain_payload,
    create_and_start,
    dag_payload,
    member_client,
    wait_until,
)

from .conftest import settled

pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.restarts]

SESSIONS = 10
TASK_S = 1.0


def start_sessions(stack) -> list[str]:
    stack.agent("builder", ALL_BUILD, duration=TASK_S)
    stack.agent("reviewer", ALL_QA, duration=TASK_S)
    client = member_client("acme", "alice")
    # Chains, and DAGs with a fan-out and a fan-in (chords, whose counters live in Redis).
    payloads = [chain_payload(TASK_S) if n % 2 else dag_payload() for n in range(SESSIONS)]
    session_ids = [create_and_start(client, payload) for payload in payloads]
    wait_until(
        lambda: Task.objects.filter(session_id__in=session_ids, status="completed").count() >= 4,
        what="the first tasks to complete",
    )
    return session_ids


def wait_for_all_to_complete(session_ids) -> None:
    try:
        wait_until(
            lambda: len(settled(session_ids)) == SESSIONS, timeout=90, interval=0.5, what="every session to settle"
        )
    except AssertionError:
        for session in Session.objects.filter(pk__in=session_ids).exclude(pk__in=list(settled(session_ids))):
            tasks = session.tasks.values_list("key", "status", "attempts", "via_canvas", "message_id", "error")
            print(f"stuck: {session.pk} {session.status}", *tasks, sep="\n  ")
        raise
    assert set(settled(session_ids).values()) == {"completed"}, settled(session_ids)
    assert not Task.objects.filter(session_id__in=session_ids).exclude(status="completed").exists()


def restart_redis_without_its_data() -> None:
    redis_client().set("r3:before-the-restart", 1)
    redis_client().shutdown(nosave=True)  # it keeps nothing on disk either way
    wait_until(lambda: not redis_answers(settings.REDIS_URL), timeout=10, what="Redis to stop")
    time.sleep(1.0)  # the workers see it gone
    # Started again the way `make` starts it (it answers again before this returns).
    env = {**os.environ, "DATABASE_URL": "", "REDIS_URL": settings.REDIS_URL}
    subprocess.run([sys.executable, "scripts/ensure_services.py"], cwd=ROOT, env=env, check=True)
    assert not redis_client().exists("r3:before-the-restart")  # the data is gone


@pytest.mark.only_broker("redis")
def test_r3_redis_restarted_with_its_data_gone_every_session_still_completes(sweeping):
    session_ids = start_sessions(sweeping)

    restart_redis_without_its_data()

    wait_for_all_to_complete(session_ids)
    resent = SessionEvent.objects.filter(session_id__in=session_ids, reason__contains="no longer held the messages")
    print(f"R3: {resent.count()} sessions had lost messages sent again")
    assert resent.exists()  # the restart did lose work, and the sweeper found it


def restart_rabbitmq() -> None:
    """Stop the RabbitMQ node, and start it again the way `make` starts it."""
    subprocess.run(["rabbitmqctl", "-q", "stop"], check=True, capture_output=True)
    wait_until(lambda: not rabbitmq_answers(settings.CELERY_BROKER_URL), timeout=30, what="RabbitMQ to stop")
    time.sleep(1.0)  # the workers see it gone
    env = {**os.environ, "DATABASE_URL": "", "CELERY_BROKER_URL": settings.CELERY_BROKER_URL}
    subprocess.run([sys.executable, "scripts/ensure_services.py"], cwd=ROOT, env=env, check=True)


@pytest.mark.only_broker("amqp")
def test_r3_rabbitmq_restarted_under_running_sessions_every_session_still_completes(sweeping):
    session_ids = start_sessions(sweeping)
    try:
        restart_rabbitmq()
    finally:  # the broker of every test after this one
        subprocess.run([sys.executable, "scripts/ensure_services.py"], cwd=ROOT, check=False)

    # Durable queues and persistent messages: what waited is still there; what a worker held
    # goes back to its queue. The workers reconnect and every session completes.
    wait_for_all_to_complete(session_ids)


def local_postgres_version() -> str | None:
    """The version of the local PostgreSQL cluster the tests use, if this machine manages it."""
    clusters = Path("/etc/postgresql")
    host = settings.DATABASES["default"]["HOST"]
    if not shutil.which("pg_ctlcluster") or not clusters.is_dir() or host not in ("127.0.0.1", "localhost", ""):
        return None
    return sorted(p.name for p in clusters.iterdir())[-1]


def server_start_time():
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_postmaster_start_time()")
        return cursor.fetchone()[0]


@pytest.mark.every_broker
def test_r4_postgresql_restarted_under_running_sessions_every_session_still_completes(sweeping):
    version = local_postgres_version()
    host = urlparse(os.environ["DATABASE_URL"]).hostname
    assert version, f"R4 restarts PostgreSQL: it needs the local cluster `make test` uses (pg_ctlcluster), not {host}"
    session_ids = start_sessions(sweeping)

    started_before = server_start_time()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True)
    connections.close_all()  # this process's connection died with the server too
    assert server_start_time() > started_before

    wait_for_all_to_complete(session_ids)
