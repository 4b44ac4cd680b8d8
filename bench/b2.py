"""B2 makespan: DAGs of sleeping scripted tasks against their critical path."""

import statistics

from bench import shapes
from bench.ours import run_session
from bench.workers import Workers
from tenants.models import Tenant

DEFAULT_UNIT_S = 0.5
TARGET_RATIO = 1.10
RUN_TIMEOUT_S = 120.0
AGENT = "bench-sleeper"


def row(shape: str, specs: list[shapes.Spec], busy: list[float], elapsed: list[float]) -> dict:
    critical = shapes.critical_path_s(specs)
    makespan, end_to_end = statistics.median(busy), statistics.median(elapsed)
    return {
        "shape": shape,
        "tasks": len(specs),
        "critical_path_s": round(critical, 3),
        "makespan_s": round(makespan, 3),
        "ratio": round(makespan / critical, 3),
        "end_to_end_s": round(end_to_end, 3),
        "end_to_end_ratio": round(end_to_end / critical, 3),
        "target": TARGET_RATIO,
        "met": makespan / critical <= TARGET_RATIO,
        "makespan_runs_s": [round(s, 3) for s in busy],
        "end_to_end_runs_s": [round(s, 3) for s in elapsed],
    }


def run_b2(workers: Workers, tenant: Tenant, repeats: int, unit_s: float = DEFAULT_UNIT_S) -> dict:
    dags = shapes.makespan_shapes(unit_s)
    concurrency = max(shapes.widest_level(specs) for specs in dags.values())
    workers.agent(AGENT, concurrency)
    try:
        run_session(tenant, "B2 warm-up", shapes.fan(concurrency), timeout_s=RUN_TIMEOUT_S)
        runs = {shape: ([], []) for shape in dags}
        for rep in range(repeats):
            for shape, specs in dags.items():
                run = run_session(tenant, f"B2 {shape} #{rep + 1}", specs, timeout_s=RUN_TIMEOUT_S)
                runs[shape][0].append(run.busy_s)
                runs[shape][1].append(run.elapsed_s)
    finally:
        workers.stop(AGENT)
    return {
        "unit_s": unit_s,
        "workers": f"1 agent worker (scripted, sleeps params.duration_s) x concurrency {concurrency}, "
        "plus the orchestrator worker x 2",
        "makespan": "first task's started_at -> last task's finished_at (the ratio and target use this)",
        "end_to_end": "start_session() -> the settling event, pushed by Redis pub/sub",
        "repeats": repeats,
        "rows": [row(shape, dags[shape], *runs[shape]) for shape in dags],
    }
