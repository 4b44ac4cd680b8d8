"""B5 fair share (issue 16): how long one tenant's ready task waits behind another tenant's flood.

Tenant "flood" starts FLOOD_TASKS ready tasks at priority 9 (two sessions of 200 independent
tasks: the largest a session may be), each sleeping TASK_S, on one agent of concurrency
CONCURRENCY. Once the flood runs, tenant "calm" starts one task at priority 0. Its wait is the
time from start_session() to the task's started_at, divided by one task's duration (target <= 2).
Then the flood is cancelled (what follows would measure nothing) and the next run starts.

Without fair share every flood message is on the queue ahead of the calm tenant's, and at a
higher priority: it waits for all of them, FLOOD_TASKS * TASK_S / CONCURRENCY = 20 s, about 100
task durations. The flood's own throughput is shown too: fair share must not idle the agent.
"""

import statistics
import time

from django.db.models import Max, Min
from django.utils import timezone

from bench import BenchError
from bench.ours import new_session, vacuum
from bench.shapes import CAPABILITY, task
from bench.workers import Workers
from sessions.models import ACTIVE, Session
from tasks.lifecycle import cancel_session, start_session
from tasks.models import Task
from tenants.models import Tenant

FLOOD_TASKS = 400
SESSION_TASKS = 200
CONCURRENCY = 4
TASK_S = 0.2
TARGET_WAITS = 2.0
FLOOD_RUNS_S = 1.0  # the flood runs this long before the calm tenant's task arrives
TIMEOUT_S = 120.0
AGENT = "bench-fair"


def _tenant(slug: str) -> Tenant:
    tenant, _ = Tenant.objects.get_or_create(slug=slug, defaults={"name": slug})
    Session.objects.filter(tenant=tenant).delete()
    return tenant


def _session(tenant: Tenant, title: str, count: int, priority: int) -> Session:
    session = new_session(tenant, title, [task(f"t{i:03d}", seconds=TASK_S) for i in range(count)])
    Session.objects.filter(pk=session.pk).update(priority=priority)
    session.priority = priority
    return session


def _wait(what: str, done) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        if time.monotonic() > deadline:
            raise BenchError(f"B5: {what} not seen after {TIMEOUT_S:g}s; see .run/{AGENT}.log")
        time.sleep(0.01)


def one_run(flood: Tenant, calm: Tenant, rep: int) -> dict:
    floods = [
        _session(flood, f"B5 flood #{rep} part {n}", SESSION_TASKS, 9) for n in range(FLOOD_TASKS // SESSION_TASKS)
    ]
    lone = _session(calm, f"B5 calm #{rep}", 1, 0)
    vacuum()
    flood_tasks = Task.objects.filter(session__in=floods)
    for session in floods:
        start_session(session, actor="bench")
    _wait("the flood's first task", lambda: flood_tasks.filter(started_at__isnull=False).exists())
    time.sleep(FLOOD_RUNS_S)
    asked = timezone.now()
    start_session(lone, actor="bench")
    lone_task = Task.objects.filter(session=lone)
    _wait("the calm tenant's task starting", lambda: lone_task.filter(started_at__isnull=False).exists())
    started = lone_task.get().started_at
    span = flood_tasks.filter(started_at__isnull=False).aggregate(first=Min("started_at"), last=Max("started_at"))
    ran = flood_tasks.filter(started_at__isnull=False).count()
    flood_before = flood_tasks.filter(started_at__gt=asked, started_at__lt=started).count()
    for session in floods:
        session.refresh_from_db()
        if session.status in ACTIVE:
            cancel_session(session, actor="bench")
    _wait("the calm session settling", lambda: Session.objects.get(pk=lone.pk).status not in ACTIVE)
    _wait(
        "the flood stopping",
        lambda: not Task.objects.filter(session__in=floods, status=Task.Status.RUNNING).exists(),
    )
    flood_s = (span["last"] - span["first"]).total_seconds()
    return {
        "wait_s": (started - asked).total_seconds(),
        "flood_started_meanwhile": flood_before,
        # Flood tasks started per second while it ran, against what the agent can do.
        "flood_rate": (ran - 1) / flood_s if flood_s > 0 else 0.0,
    }


def run_b5(workers: Workers, repeats: int) -> dict:
    flood, calm = _tenant("b5-flood"), _tenant("b5-calm")
    workers.agent(AGENT, CONCURRENCY)
    try:
        runs = [one_run(flood, calm, rep + 1) for rep in range(min(repeats, 5))]
    finally:
        workers.stop(AGENT)
    waits = [run["wait_s"] / TASK_S for run in runs]
    best_rate = CONCURRENCY / TASK_S
    return {
        "setup": f"{FLOOD_TASKS} ready tasks of tenant b5-flood at priority 9 ({FLOOD_TASKS // SESSION_TASKS} "
        f"sessions), then 1 of tenant b5-calm at priority 0; one agent x concurrency {CONCURRENCY}, "
        f"{TASK_S:g} s tasks, capability {CAPABILITY}",
        "runs": len(runs),
        "wait_in_tasks": round(statistics.median(waits), 2),
        "wait_in_tasks_max": round(max(waits), 2),
        "flood_started_meanwhile": statistics.median(run["flood_started_meanwhile"] for run in runs),
        "flood_utilisation": round(statistics.median(run["flood_rate"] for run in runs) / best_rate, 2),
        "target": TARGET_WAITS,
        "met": max(waits) <= TARGET_WAITS,
    }
