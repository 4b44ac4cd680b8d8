"""B1 dispatch overhead: zero-work DAGs through our system against raw Celery canvases of the same
shape, same broker, same worker count and concurrency, measured in the same run.

A third side, the floor, is raw Celery whose task only claims and records a task row (bench/rawapp.py):
the database work the design asks of every task, with nothing else around it. floor / raw is a lower
bound for the ratio of any implementation of the design on this machine; ours / floor is what our code
adds to it (and our side's start, settling and end detection, which raw and floor do not have)."""

import statistics
import time
from collections.abc import Callable

from celery.canvas import Signature
from django.conf import settings

from agents.models import Agent
from bench import BenchError, rawapp, shapes
from bench.ours import new_session, run_session, vacuum
from bench.workers import Workers
from sessions.models import Session
from tasks.models import Task
from tenants.models import Tenant

CHAIN_LENGTH = 200
FAN_WIDTH = 498  # 1 root + 498 + 1 sink = 500 tasks
CONCURRENCY = 4
TARGET_RATIO = 1.5
RUN_TIMEOUT_S = 300.0
AGENT = "bench-dispatch"

# Per shape: its task count, our session's specs, and the raw canvas of the same shape from its steps.
SHAPES: dict[str, tuple[int, Callable[[], list[shapes.Spec]], Callable[[list[Signature]], Signature]]] = {
    "chain": (CHAIN_LENGTH, lambda: shapes.chain(CHAIN_LENGTH), rawapp.chain_canvas),
    "fan": (FAN_WIDTH + 2, lambda: shapes.fan(FAN_WIDTH), rawapp.fan_canvas),
}


def run_raw(build: Callable[[], Signature], side: str = "raw", timeout_s: float = RUN_TIMEOUT_S) -> float:
    """Seconds from building and sending the canvas until its last task's result is stored.
    `side`: raw or floor, for the messages.

    Polled every 10 ms (a Redis GET): result.get()'s pub/sub wake-up measured 40-100 ms slower
    here, which would flatter our ratio. Polling at 2 ms measured the same as at 10 ms."""
    started = time.perf_counter()
    result = build().apply_async()
    deadline = time.monotonic() + timeout_s
    while not result.ready():
        if time.monotonic() > deadline:
            raise BenchError(f"{side} canvas not done after {timeout_s:g}s; see .run/bench-raw.log")
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    if not result.successful():
        raise BenchError(f"{side} canvas failed: {result.result!r}")
    return elapsed


def run_floor(
    tenant: Tenant, title: str, specs: list[shapes.Spec], canvas: Callable[[list[Signature]], Signature]
) -> float:
    """The floor's seconds for one run, measured as run_raw measures raw Celery, on the tasks of a
    session made for it: marked running, its tasks queued, and deleted after the run. Nothing of
    ours runs meanwhile (the sides take turns, and the bench starts no Beat); the tasks are marked
    as canvas nodes with a message out, so that fair share does not take them for held ones."""
    session = new_session(tenant, title, specs)
    try:
        Session.objects.filter(pk=session.pk).update(status=Session.Status.RUNNING)
        rows = Task.objects.filter(session=session).order_by("position")
        rows.update(status=Task.Status.QUEUED, via_canvas=True, message_id="bench-floor")
        ids = list(rows.values_list("pk", flat=True))
        agent = Agent.objects.values_list("pk", flat=True).get(name=AGENT)
        vacuum()  # as before each of our runs
        elapsed = run_raw(lambda: canvas(rawapp.claims(ids, agent)), side="floor")
        if rows.exclude(status=Task.Status.COMPLETED, attempts=1).exists():
            raise BenchError(f"floor run {title}: not every task was claimed and recorded once")
        return elapsed
    finally:
        Session.objects.filter(pk=session.pk).delete()


def run_sides(tenant: Tenant, title: str, shape: str) -> dict[str, float]:
    """One run of the shape on each side, in seconds."""
    count, specs, canvas = SHAPES[shape]
    return {
        "ours": run_session(tenant, title, specs(), timeout_s=RUN_TIMEOUT_S).elapsed_s,
        "raw": run_raw(lambda: canvas(rawapp.noops(count))),
        "floor": run_floor(tenant, f"{title} (floor)", specs(), canvas),
    }


def measure(tenant: Tenant, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per run, after one unmeasured run of each shape per side (connections, prepared
    statements and imports warm in every pool process); the sides alternate so that background
    noise hits them alike."""
    for shape in SHAPES:
        run_sides(tenant, f"B1 warm-up {shape}", shape)
    runs = {shape: {"ours": [], "raw": [], "floor": []} for shape in SHAPES}
    for rep in range(repeats):
        for shape in SHAPES:
            for side, seconds in run_sides(tenant, f"B1 {shape} #{rep + 1}", shape).items():
                runs[shape][side].append(seconds)
    return runs


def row(shape: str, tasks: int, ours: list[float], raw: list[float], floor: list[float]) -> dict:
    ours_ms, raw_ms, floor_ms = (1000 * statistics.median(runs) / tasks for runs in (ours, raw, floor))
    ratio = ours_ms / raw_ms
    return {
        "shape": shape,
        "tasks": tasks,
        "ours_ms_per_task": round(ours_ms, 2),
        "raw_ms_per_task": round(raw_ms, 2),
        "ratio": round(ratio, 2),
        "target": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
        "floor_ms_per_task": round(floor_ms, 2),
        "floor_ratio": round(floor_ms / raw_ms, 2),
        "ours_over_floor": round(ours_ms / floor_ms, 2),
        "ours_runs_s": [round(s, 3) for s in ours],
        "raw_runs_s": [round(s, 3) for s in raw],
        "floor_runs_s": [round(s, 3) for s in floor],
    }


def run_b1(workers: Workers, tenant: Tenant, repeats: int) -> dict:
    workers.agent(AGENT, CONCURRENCY)
    workers.raw(CONCURRENCY)
    try:
        runs = measure(tenant, repeats)
    finally:
        workers.stop(AGENT)
        workers.stop("bench-raw")
    broker = {"redis": "Redis", "amqp": "RabbitMQ"}[settings.BROKER_KIND]
    return {
        "broker": broker,
        "workers": (
            f"ours: 1 agent worker (scripted, duration 0) x concurrency {CONCURRENCY}, plus the orchestrator "
            f"worker x 2 (extra infrastructure: dispatch_session, finalize_session); "
            f"raw and floor: 1 worker x concurrency {CONCURRENCY}; all prefork, same {broker} broker and Redis "
            "result backend; floor: raw Celery whose task only claims and records a task row (two statements, "
            "committed: the database work the design asks of every task, a lower bound)"
        ),
        "measured": (
            "ours: start_session() -> the settling event (Redis pub/sub); "
            "raw and floor: apply_async() -> last result ready (polled every 10 ms)"
        ),
        "repeats": repeats,
        "rows": [row(shape, tasks, **runs[shape]) for shape, (tasks, _, _) in SHAPES.items()],
    }
