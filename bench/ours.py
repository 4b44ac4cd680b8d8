"""Running a DAG through our system: create_session, start_session, wait for the settled status."""

import time
from contextlib import contextmanager
from dataclasses import dataclass

from django.db import connection
from django.db.models import Max, Min

from bench import BenchError
from bench.shapes import Spec
from orchestrator_project.redis_client import redis_client
from sessions import feed
from sessions.models import SETTLED, Session
from tasks import statements
from tasks.lifecycle import create_session, start_session
from tasks.models import Task
from tenants.models import Tenant

# How often the row is looked at while waiting for the settling event, in case it was not published.
RECHECK_S = 0.5
LOOK_S = 0.01
# The look: a prepared statement, as cheap as the client side can make it (raw Celery's side
# looks with a Redis GET), so that looking takes as little of the workers' CPU as it can.
STATUS = "SELECT status FROM agent_sessions_session WHERE id = %s"


@dataclass
class SessionRun:
    elapsed_s: float  # start_session() called -> settled status seen
    busy_s: float  # first task's started_at -> last task's finished_at


# The benchmarks' tenants measure the system, not a tenant's quotas: B4 starts 120 sessions at
# once, on top of a history that may hold unsettled ones.
BENCH_QUOTAS = {"max_active_sessions": 1_000_000, "max_open_tasks": 100_000_000}


def bench_tenant(slug: str = "bench", name: str = "Benchmarks") -> Tenant:
    tenant, _ = Tenant.objects.update_or_create(slug=slug, defaults={"name": name, **BENCH_QUOTAS})
    return tenant


def forget_earlier_runs(tenant: Tenant) -> None:
    """Delete the sessions of earlier runs, so that every run starts from tables of the same size."""
    Session.objects.filter(tenant=tenant).delete()
    vacuum()


def vacuum() -> None:
    """VACUUM (ANALYZE) the bench database: outside the timed part of every run.

    PostgreSQL may run without autovacuum (this machine's CI configuration turns it off); dead
    rows of earlier runs (every task row is updated four times) would then make each index scan
    slower than the one before, and the planner would go on planning for empty tables."""
    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE)")


def new_session(tenant: Tenant, title: str, specs: list[Spec]) -> Session:
    data = {
        "title": title,
        "requirements": f"benchmark: {title}",
        "priority": 5,
        "timeout_seconds": 600,
        "max_retries": 0,
        "tasks": specs,
    }
    session, _ = create_session(tenant=tenant, user=None, data=data)
    return session


def run_session(tenant: Tenant, title: str, specs: list[Spec], *, timeout_s: float) -> SessionRun:
    session = new_session(tenant, title, specs)
    vacuum()  # statistics that include this session's rows, as autovacuum would keep them
    with session_events(session.pk) as events:
        started = time.perf_counter()
        start_session(session, actor="bench")
        status = wait_settled(session.pk, events, timeout_s)
        elapsed = time.perf_counter() - started
    if status != Session.Status.COMPLETED:
        raise BenchError(f"session {title} ({session.pk}) ended {status}, not completed; see .run/*.log")
    span = Task.objects.filter(session=session).aggregate(first=Min("started_at"), last=Max("finished_at"))
    return SessionRun(elapsed_s=elapsed, busy_s=(span["last"] - span["first"]).total_seconds())


@contextmanager
def session_events(session_id):
    """The announcements of the session's tenant (Redis pub/sub, sessions/feed.py), subscribed
    before anything can happen."""
    pubsub = redis_client().pubsub(ignore_subscribe_messages=True)
    tenant = Session.objects.filter(pk=session_id).values_list("tenant_id", flat=True).get()
    pubsub.subscribe(feed.channel(tenant))
    try:
        yield pubsub
    finally:
        pubsub.close()


def wait_settled(session_id, events, timeout_s: float) -> str:
    """Until the session has settled, looked at when a change of it is announced, as a client
    watching its stream would see it, but not more often than every LOOK_S: every task's claim
    and outcome is announced, and a query for each would take the workers' CPU (raw Celery's
    side polls as often). Announcing is best effort, so the row is looked at every RECHECK_S too."""
    deadline = time.monotonic() + timeout_s
    looked = 0.0
    while True:
        events.get_message(timeout=RECHECK_S)
        while events.get_message(timeout=0) is not None:
            pass  # what came meanwhile: one look answers all of it
        time.sleep(max(0.0, looked + LOOK_S - time.monotonic()))
        looked = time.monotonic()
        [(status,)] = statements.run(STATUS, [session_id])
        if status in SETTLED:
            return status
        if time.monotonic() > deadline:
            raise BenchError(f"session {session_id} still {status} after {timeout_s:g}s; see .run/*.log")
