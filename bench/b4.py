"""B4 cost against history: every read, the hot path, a heartbeat, each sweep and end-to-end
throughput, measured with 1,000 and with 100,000 finished sessions stored (1,000,000 with
--million), and the growth ratio of each. Target: every ratio at most 1.5.

The API is called in process (DRF's test client with a member's token: authentication,
routing, the view, the serializer and every query, no HTTP server). The hot path, the heartbeat
and the sweeps are called in process on the bench database. Throughput runs zero-work sessions
through the worker processes. The history sits on the very agents that are measured.
"""

import os
import statistics
import time
from collections.abc import Callable

from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from agents.models import Agent
from agents.runtime import AgentRuntime
from bench import BenchError, history, shapes
from bench.ours import bench_tenant, new_session, session_events, wait_settled
from bench.workers import ORCHESTRATOR, Workers
from sessions.models import Session
from tasks import leases, sweeps
from tasks.fleet import mark_silent_agents_offline, record_heartbeat, register_worker
from tasks.lifecycle import start_session
from tasks.models import Task
from tasks.routing import queue_for
from tasks.running import execute_task
from tenants.models import Membership, Tenant
from tokens.services import issue_token, revoke_tokens

TARGET_RATIO = 1.5
LEVELS = (1_000, 100_000)
MILLION = 1_000_000
WORKER_AGENT = "bench-b4"
INPROCESS_AGENT = "bench-b4-inprocess"
CONCURRENCY = 4
THROUGHPUT_SESSIONS = 120
THROUGHPUT_RUNS = 3
SAMPLES = 25
RUN_TIMEOUT_S = 300.0


def median_ms(call: Callable[[], object], samples: int = SAMPLES) -> float:
    """The median of `samples` timed calls, after two that warm caches and prepared plans up."""
    times = []
    for n in range(samples + 2):
        started = time.perf_counter()
        call()
        if n >= 2:
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def api_client(tenant: Tenant) -> APIClient:
    user, _ = get_user_model().objects.get_or_create(username="bench-b4-reader")
    Membership.objects.get_or_create(user=user, tenant=tenant, defaults={"role": Membership.Role.VIEWER})
    revoke_tokens(user)  # the previous run's
    client = APIClient(SERVER_NAME="127.0.0.1")
    client.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(user, name='bench b4')[1]}")
    return client


def reads(client: APIClient, tenant: Tenant) -> dict[str, float]:
    newest = Session.objects.filter(tenant=tenant, title__startswith="history").order_by("-created_at").first()
    base = "/api/v1/sessions/"

    def get(path: str) -> Callable[[], object]:
        def call() -> None:
            response = client.get(path, secure=True)  # as behind the TLS proxy DEBUG=false expects
            if response.status_code != 200:
                raise BenchError(f"GET {path}: HTTP {response.status_code}: {response.content[:300]!r}")

        return call

    return {
        "GET /sessions/?page_size=50": median_ms(get(f"{base}?page_size=50")),
        "GET /sessions/?status=completed": median_ms(get(f"{base}?status=completed&page_size=50")),
        "GET /sessions/?page=10": median_ms(get(f"{base}?page=10&page_size=50")),
        "GET /sessions/<id>/": median_ms(get(f"{base}{newest.pk}/")),
        "GET /sessions/<id>/tasks/": median_ms(get(f"{base}{newest.pk}/tasks/")),
        "GET /sessions/<id>/events/": median_ms(get(f"{base}{newest.pk}/events/")),
    }


def hot_path(tenant: Tenant, agent: Agent) -> dict[str, float]:
    """A routed task: a two-task chain whose first task ran on the agent with history, so
    routing weighs that agent for the second; then the second's claim, run and record."""
    runtime = AgentRuntime(agent.pk, agent.name, "scripted", {"duration_s": 0.0, "fail_rate": 0.0})
    routed, executed = [], []
    for n in range(SAMPLES + 2):
        session = new_session(tenant, f"B4 hot path {n}", shapes.chain(2))
        start_session(session, actor="bench")
        first, second = Task.objects.filter(session=session).order_by("position")
        execute_task(task_id=first.pk, runtime=runtime, delivered_to=f"agent.{agent.name}")
        second.refresh_from_db()
        started = time.perf_counter()
        queue_for(second, {})
        middle = time.perf_counter()
        outcome = execute_task(task_id=second.pk, runtime=runtime, delivered_to=f"agent.{agent.name}")
        ended = time.perf_counter()
        if outcome != Task.Status.COMPLETED:
            raise BenchError(f"B4 hot path: the second task ended {outcome}")
        if n >= 2:
            routed.append(1000 * (middle - started))
            executed.append(1000 * (ended - middle))
    return {
        "route a task (affinity)": statistics.median(routed),
        "claim, run, record a task": statistics.median(executed),
    }


def fleet_and_sweeps(agent: Agent) -> dict[str, float]:
    return {
        "heartbeat": median_ms(lambda: record_heartbeat(agent, [os.getpid()])),
        "sweep: expired leases": median_ms(leases.reap_expired_leases),
        "sweep: silent agents": median_ms(mark_silent_agents_offline),
        "sweep: degraded sessions": median_ms(sweeps.sweep_degraded_sessions),
        "sweep: stuck sessions": median_ms(sweeps.sweep_stuck_sessions),
        "sweep: retention": median_ms(sweeps.apply_retention),
    }


def throughput(tenant: Tenant, workers: Workers) -> dict[str, float]:
    """Sessions per minute: THROUGHPUT_SESSIONS six-task zero-work sessions started at once,
    until the last settles; the median of THROUGHPUT_RUNS runs. And the CPU time the agent
    worker spent per task and the orchestrator worker per session meanwhile (their processes'
    own time, not PostgreSQL's or Redis's)."""
    rates, agent_cpu, orchestrator_cpu = [], [], []
    for run in range(THROUGHPUT_RUNS):
        batch = [
            new_session(tenant, f"B4 e2e {run}.{n}", shapes.fan(history.TASKS_PER_SESSION - 2))
            for n in range(THROUGHPUT_SESSIONS)
        ]
        cpu_before = workers.cpu_seconds(WORKER_AGENT), workers.cpu_seconds(ORCHESTRATOR)
        started = time.perf_counter()
        for session in batch:
            start_session(session, actor="bench")
        for session in batch:
            with session_events(session.pk) as events:
                status = wait_settled(session.pk, events, RUN_TIMEOUT_S)
            if status != Session.Status.COMPLETED:
                raise BenchError(f"B4: session {session.pk} ended {status}; see .run/*.log")
        rates.append(60 * THROUGHPUT_SESSIONS / (time.perf_counter() - started))
        agent_cpu.append(workers.cpu_seconds(WORKER_AGENT) - cpu_before[0])
        orchestrator_cpu.append(workers.cpu_seconds(ORCHESTRATOR) - cpu_before[1])
    tasks = THROUGHPUT_SESSIONS * history.TASKS_PER_SESSION
    return {
        "end-to-end sessions/min": statistics.median(rates),
        "agent worker CPU per task": 1000 * statistics.median(agent_cpu) / tasks,
        "orchestrator CPU per session": 1000 * statistics.median(orchestrator_cpu) / THROUGHPUT_SESSIONS,
    }


def measure_level(tenant: Tenant, client: APIClient, agents: dict[str, Agent], workers: Workers) -> dict[str, float]:
    figures = reads(client, tenant)
    figures |= hot_path(tenant, agents[INPROCESS_AGENT])
    figures |= fleet_and_sweeps(agents[WORKER_AGENT])
    figures |= throughput(tenant, workers)
    # What the measuring added is not history: the next level starts from the same count.
    history.forget_measured(tenant)
    return figures


def run_b4(workers: Workers, million: bool) -> dict:
    tenant = bench_tenant("bench-history", "B4 history")
    history.forget_all()
    inprocess = register_worker(
        name=INPROCESS_AGENT, capabilities=[shapes.CAPABILITY], executor="scripted", concurrency=CONCURRENCY
    )
    record_heartbeat(inprocess)  # live: routing weighs only live agents
    workers.agent(WORKER_AGENT, CONCURRENCY)
    agents = {a.name: a for a in Agent.objects.filter(name__in=(WORKER_AGENT, INPROCESS_AGENT))}
    client = api_client(tenant)
    levels = [*LEVELS, MILLION] if million else list(LEVELS)
    results = {}
    try:
        for level in levels:
            seconds = history.grow(tenant, list(agents.values()), level)
            record_heartbeat(inprocess)
            tasks = Task.objects.filter(session__tenant=tenant).count()
            results[level] = {
                "generated_s": round(seconds, 1),
                "tasks": tasks,
                "bytes": history.table_bytes(),
                "figures": measure_level(tenant, client, agents, workers),
            }
    finally:
        workers.stop(WORKER_AGENT)
        Agent.objects.filter(pk=inprocess.pk).update(status=Agent.Status.OFFLINE, current_load=0)
        history.forget_all()
    base = results[levels[0]]["figures"]
    rows = []
    for name, first in base.items():
        row = {"what": name, **{str(level): round(results[level]["figures"][name], 2) for level in levels}}
        for level in levels[1:]:
            value = results[level]["figures"][name]
            # Throughput falls as cost grows: its growth is the first rate over this one.
            growth = first / value if name.startswith("end-to-end") else value / first
            row[f"growth {level}"] = round(growth, 2)
        row["met"] = row[f"growth {LEVELS[1]}"] <= TARGET_RATIO  # the target is for 100,000
        rows.append(row)
    low, high = results[levels[0]], results[levels[-1]]
    return {
        "levels": levels,
        # What one more session costs on disk: the difference between two levels, so that the
        # tables' fixed overhead and the measuring's own rows cancel out.
        "bytes_per_session": round((high["bytes"] - low["bytes"]) / (levels[-1] - levels[0])),
        "tasks_per_session": history.TASKS_PER_SESSION,
        "generated": {str(level): results[level]["generated_s"] for level in levels},
        "tasks": {str(level): results[level]["tasks"] for level in levels},
        "target": TARGET_RATIO,
        "rows": rows,
        "measured": (
            f"median of {SAMPLES} calls in process (API: DRF test client with a token); throughput: "
            f"{THROUGHPUT_SESSIONS} six-task zero-work sessions at once on 1 agent worker x {CONCURRENCY}, "
            f"median of {THROUGHPUT_RUNS} runs; CPU: the worker's processes' user + system time meanwhile"
        ),
    }
