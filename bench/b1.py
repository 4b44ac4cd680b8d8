"""B1 dispatch overhead: zero-work DAGs through our system against raw Celery canvases of the same
shape, same broker, same worker count and concurrency, measured in the same run."""

import statistics
import time
from collections.abc import Callable

from celery.canvas import Signature
from django.conf import settings

from bench import BenchError, rawapp, shapes
from bench.ours import run_session
from bench.workers import Workers
from tenants.models import Tenant

CHAIN_LENGTH = 200
FAN_WIDTH = 498  # 1 root + 498 + 1 sink = 500 tasks
CONCURRENCY = 4
TARGET_RATIO = 1.5
RUN_TIMEOUT_S = 300.0
AGENT = "bench-dispatch"

SHAPES: dict[str, tuple[int, Callable[[], list[shapes.Spec]], Callable[[], Signature]]] = {
    "chain": (CHAIN_LENGTH, lambda: shapes.chain(CHAIN_LENGTH), lambda: rawapp.chain_canvas(CHAIN_LENGTH)),
    "fan": (FAN_WIDTH + 2, lambda: shapes.fan(FAN_WIDTH), lambda: rawapp.fan_canvas(FAN_WIDTH)),
}


def run_raw(build: Callable[[], Signature], timeout_s: float = RUN_TIMEOUT_S) -> float:
    """Seconds from building and sending the canvas until its last task's result is stored.

    Polled every 10 ms (a Redis GET): result.get()'s pub/sub wake-up measured 40-100 ms slower
    here, which would flatter our ratio. Polling at 2 ms measured the same as at 10 ms."""
    started = time.perf_counter()
    result = build().apply_async()
    deadline = time.monotonic() + timeout_s
    while not result.ready():
        if time.monotonic() > deadline:
            raise BenchError(f"raw canvas not done after {timeout_s:g}s; see .run/bench-raw.log")
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    if not result.successful():
        raise BenchError(f"raw canvas failed: {result.result!r}")
    return elapsed


def warm_up(tenant: Tenant) -> None:
    """One unmeasured run of each shape per side, so that connections, prepared statements and
    imports in every pool process are warm before the first measured run."""
    for shape, (_, specs, canvas) in SHAPES.items():
        run_session(tenant, f"B1 warm-up {shape}", specs(), timeout_s=RUN_TIMEOUT_S)
        run_raw(canvas)


def measure(tenant: Tenant, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per run; the two sides alternate so that background noise hits both alike."""
    runs = {shape: {"ours": [], "raw": []} for shape in SHAPES}
    for rep in range(repeats):
        for shape, (_, specs, canvas) in SHAPES.items():
            ours = run_session(tenant, f"B1 {shape} #{rep + 1}", specs(), timeout_s=RUN_TIMEOUT_S)
            runs[shape]["ours"].append(ours.elapsed_s)
            runs[shape]["raw"].append(run_raw(canvas))
    return runs


def row(shape: str, tasks: int, ours: list[float], raw: list[float]) -> dict:
    ours_ms = 1000 * statistics.median(ours) / tasks
    raw_ms = 1000 * statistics.median(raw) / tasks
    ratio = ours_ms / raw_ms
    return {
        "shape": shape,
        "tasks": tasks,
        "ours_ms_per_task": round(ours_ms, 2),
        "raw_ms_per_task": round(raw_ms, 2),
        "ratio": round(ratio, 2),
        "target": TARGET_RATIO,
        "met": ratio <= TARGET_RATIO,
        "ours_runs_s": [round(s, 3) for s in ours],
        "raw_runs_s": [round(s, 3) for s in raw],
    }


def run_b1(workers: Workers, tenant: Tenant, repeats: int) -> dict:
    workers.agent(AGENT, CONCURRENCY)
    workers.raw(CONCURRENCY)
    try:
        warm_up(tenant)
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
            f"raw: 1 worker x concurrency {CONCURRENCY}; both prefork, same {broker} broker and Redis result backend"
        ),
        "measured": (
            "start_session() -> the settling event (Redis pub/sub); "
            "apply_async() -> last result ready (polled every 10 ms)"
        ),
        "repeats": repeats,
        "rows": [row(shape, tasks, **runs[shape]) for shape, (tasks, _, _) in SHAPES.items()],
    }
