"""Where our per-task time goes: execute_task run in this process, every SQL statement counted
and attributed to the project function that issued it.

Runs before any worker starts, so nothing consumes the messages that start_session and the last
task send; the caller flushes them afterwards.
"""

import re
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import CodeType

from django.db import connection

from agents.models import Agent
from agents.runtime import AgentRuntime
from bench import BenchError, shapes
from bench.b1 import CHAIN_LENGTH, FAN_WIDTH
from bench.env import ROOT
from bench.ours import new_session, vacuum
from tasks.fleet import register_worker
from tasks.lifecycle import start_session
from tasks.models import Task
from tasks.running import execute_task
from tenants.models import Tenant

AGENT = "bench-inprocess"
TABLE = re.compile(r'\b(?:FROM|UPDATE|INTO)\s+"(\w+)"')
PROJECT = f"{ROOT}/"
# Django's, the benchmark's and the statement runner's frames are skipped to find who issued a
# statement (so the hot path's statements show as take_task, record_outcome ...).
SKIPPED = (f"{ROOT / '.venv'}/", f"{Path(__file__).resolve().parent}/", str(ROOT / "tasks" / "statements.py"))
_labels: dict[CodeType, str | None] = {}


def _label(code: CodeType) -> str | None:
    name = code.co_filename
    if not name.startswith(PROJECT) or name.startswith(SKIPPED):
        return None
    path = Path(name)
    return f"{path.parent.name}.{path.stem}:{code.co_name}"


def issuer() -> str:
    """The innermost project function on the stack: neither Django nor the benchmark.

    Cached per code object: this runs for every statement, inside the time it measures."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code not in _labels:
            _labels[code] = _label(code)
        if _labels[code] is not None:
            return _labels[code]
        frame = frame.f_back
    return "(other)"


class StatementLog:
    """A connection.execute_wrapper that notes each statement's issuer, kind, table and duration."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, float]] = []

    def __call__(self, execute, sql, params, many, context):
        table = TABLE.search(sql)
        label = f"{issuer()} {sql.split(None, 1)[0]} {table.group(1) if table else ''}".rstrip()
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.statements.append((label, time.perf_counter() - started))


@contextmanager
def in_process_agent():
    agent = register_worker(name=AGENT, capabilities=[shapes.CAPABILITY], executor="scripted", concurrency=1)
    try:
        yield AgentRuntime(agent.pk, agent.name, "scripted", {"duration_s": 0.0, "fail_rate": 0.0})
    finally:
        Agent.objects.filter(pk=agent.pk).update(status=Agent.Status.OFFLINE, current_load=0)


def run_in_process(tenant: Tenant, title: str, specs: list[shapes.Spec], runtime: AgentRuntime) -> list[dict]:
    """Execute every task in order (upstreams first), as the agent would; one record per task."""
    session = new_session(tenant, title, specs)
    # As before every B1 run: with fresh statistics, not plans made for the empty tables of
    # the start (this machine may run PostgreSQL without autovacuum; see bench.ours.vacuum).
    vacuum()
    start_session(session, actor="bench")
    records = []
    for task_id, key in Task.objects.filter(session=session).order_by("position").values_list("pk", "key"):
        log = StatementLog()
        started = time.perf_counter()
        with connection.execute_wrapper(log):
            outcome = execute_task(task_id=task_id, runtime=runtime, delivered_to=f"cap.{shapes.CAPABILITY}")
        elapsed = time.perf_counter() - started
        if outcome != Task.Status.COMPLETED:
            raise BenchError(f"in-process task {key} of {title}: {outcome}")
        records.append({"key": key, "ms": 1000 * elapsed, "statements": log.statements})
    return records


def summarise(shape: str, node: str, records: list[dict]) -> dict:
    """Medians over the records, and the statement breakdown of the record of median time."""
    typical = sorted(records, key=lambda r: r["ms"])[len(records) // 2]
    return {
        "shape": shape,
        "node": node,
        "tasks": len(records),
        "queries": statistics.median_low(len(r["statements"]) for r in records),
        "ms_per_task": round(statistics.median(r["ms"] for r in records), 2),
        "sql_ms_per_task": round(statistics.median(1000 * sum(s for _, s in r["statements"]) for r in records), 2),
        "breakdown": breakdown(typical["statements"]),
    }


def breakdown(statements: list[tuple[str, float]]) -> dict[str, dict]:
    """Count and milliseconds per statement label, the most expensive first."""
    counts: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    for label, spent in statements:
        counts[label] += 1
        seconds[label] += spent
    return {label: {"count": counts[label], "ms": round(1000 * s, 2)} for label, s in seconds.most_common()}


def profile_queries(tenant: Tenant) -> dict:
    with in_process_agent() as runtime:
        chain = run_in_process(tenant, "profile chain", shapes.chain(CHAIN_LENGTH), runtime)
        fan = run_in_process(tenant, "profile fan", shapes.fan(FAN_WIDTH), runtime)
    members = fan[1:-1]
    tenth = len(members) // 10
    return {
        "measured": "execute_task() in the benchmark process, one task after another, no broker; "
        "times include the statement-counting wrapper",
        "rows": [
            summarise("chain", "first", chain[:1]),
            summarise("chain", "others", chain[1:]),
            summarise("fan", "root", fan[:1]),
            summarise("fan", "member", members),
            summarise("fan", "first 10% members", members[:tenth]),
            summarise("fan", "last 10% members", members[-tenth:]),
            summarise("fan", "sink", fan[-1:]),
        ],
    }
