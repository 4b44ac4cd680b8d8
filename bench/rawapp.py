"""The baselines of B1: a bare Celery app on the orchestrator's broker whose task does nothing
(raw), and one whose task only claims and records a task row (the floor).

Started as `celery -A bench.rawapp worker`. It takes its Celery settings from the project's
settings.py (acks_late, prefetch 1, priority queues, the Redis result backend), so that the
comparison measures our code, not a different Celery configuration.

The floor is the database work the design asks of every task (docs/ARCHITECTURE.md: "PostgreSQL
is the source of truth ... Every hand-off is a compare-and-set on a row"), with nothing
of ours around it: the claim (queued -> running with one attempt more, a lease and the agent,
while the session is active) and the record (the outcome, its result and its checkpoint row),
each one statement, committed, through psycopg. It leaves out routing, fair share, the
dependents' bookkeeping, logs and metrics: a lower bound for any implementation, not a rival one.
"""

import importlib.util
import os
from functools import cache
from pathlib import Path

import psycopg
from celery import Celery, chain, chord, group
from celery.canvas import Signature

QUEUE = "bench.raw"
SETTINGS_FILE = Path(__file__).resolve().parent.parent / "orchestrator_project" / "settings.py"


def _project_settings():
    # Loaded as a plain file, not as orchestrator_project.settings: importing the package would
    # run its __init__, which creates the orchestrator's Celery app (and its Django fix-up) here.
    spec = importlib.util.spec_from_file_location("bench_project_settings", SETTINGS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETTINGS = _project_settings()
# Not the current app: in the benchmark's own process, the orchestrator's app must stay current.
app = Celery("bench_raw", set_as_current=False)
app.config_from_object(SETTINGS, namespace="CELERY")
app.conf.task_default_queue = QUEUE
app.conf.task_routes = {}


# The queue on the task too: Celery 5.6 lets the settings' CELERY_TASK_DEFAULT_QUEUE win over
# task_default_queue set here.
@app.task(name="bench.noop", queue=QUEUE)
def noop() -> None:
    """Nothing: what is left of a zero-work task without our claim and bookkeeping."""


CLAIM = """
UPDATE tasks_task t
SET status = 'running', attempts = t.attempts + 1, agent_id = %(agent)s, started_at = now(),
    lease_expires_at = now() + interval '5 minutes', worker_pid = %(pid)s
WHERE t.id = %(task)s AND t.status = 'queued' AND EXISTS (
    SELECT FROM agent_sessions_session s WHERE s.id = t.session_id AND s.status IN ('queued', 'running', 'degraded')
)
RETURNING t.attempts
"""
RECORD = """
WITH done AS (
    UPDATE tasks_task
    SET status = 'completed', result = '{}'::jsonb, finished_at = now(), lease_expires_at = NULL, worker_pid = NULL
    WHERE id = %(task)s AND status = 'running' AND attempts = %(attempt)s
    RETURNING id, session_id
)
INSERT INTO agent_sessions_checkpoint (session_id, task_id, created_at) SELECT session_id, id, now() FROM done
RETURNING task_id
"""


@cache
def _database() -> psycopg.Connection:
    """This pool process's connection to the orchestrator's database, prepared statements as ours."""
    return psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)


@app.task(name="bench.claim_and_record", queue=QUEUE)
def claim_and_record(task_id: str, agent_id: int) -> None:
    """The floor's task: claim the queued task row for the agent, then record it completed."""
    prepare = bool(SETTINGS.DB_PREPARED_STATEMENTS)
    cursor = _database().cursor()
    claimed = cursor.execute(CLAIM, {"task": task_id, "agent": agent_id, "pid": os.getpid()}, prepare=prepare)
    row = claimed.fetchone()
    if row is None:
        raise RuntimeError(f"task {task_id}: the claim found no queued task of an active session")
    if cursor.execute(RECORD, {"task": task_id, "attempt": row[0]}, prepare=prepare).fetchone() is None:
        raise RuntimeError(f"task {task_id}: the record found the claim gone")


def chain_canvas(steps: list[Signature]) -> Signature:
    return chain(*steps, app=app)


def fan_canvas(steps: list[Signature]) -> Signature:
    """root -> the rest in parallel -> sink, the shape our compiler gives a fan-out/fan-in."""
    root, *middle, sink = steps
    return chain(root, chord(group(middle), sink), app=app)


def noops(count: int) -> list[Signature]:
    return [noop.si() for _ in range(count)]


def claims(task_ids: list, agent_id: int) -> list[Signature]:
    return [claim_and_record.si(str(task_id), agent_id) for task_id in task_ids]
