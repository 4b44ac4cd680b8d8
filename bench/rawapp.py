"""The baselines of B1: a bare Celery app on the orchestrator's broker whose task does nothing
(raw), and one whose task only claims and records a task row (the floor).

Started as `celery -A bench.rawapp worker`. It takes its Celery settings from the project's
settings.py (acks_late, prefetch 1, priority queues, the Redis result backend), so that the
comparison measures our code, not a different Celery configuration.

The floor is what docs/DESIGN.md section 6 asks of every task at the least, with nothing of ours
around it: a compare-and-set claim (queued -> running, one attempt more) and a compare-and-set
record (running -> completed for that attempt) on the task's row, each committed, through psycopg
with prepared statements. No implementation of that design can run a task for less.
"""

import importlib.util
from functools import cache
from pathlib import Path

import psycopg
from celery import Celery, chain, chord, group
from celery.canvas import Signature

QUEUE = "bench.raw"
SETTINGS_FILE = Path(__file__).resolve().parent.parent / "orchestrator_project" / "settings.py"


@cache
def _project_settings():
    # Loaded as a plain file, not as orchestrator_project.settings: importing the package would
    # run its __init__, which creates the orchestrator's Celery app (and its Django fix-up) here.
    spec = importlib.util.spec_from_file_location("bench_project_settings", SETTINGS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Not the current app: in the benchmark's own process, the orchestrator's app must stay current.
app = Celery("bench_raw", set_as_current=False)
app.config_from_object(_project_settings(), namespace="CELERY")
app.conf.task_default_queue = QUEUE
app.conf.task_routes = {}


# The queue on the task too: Celery 5.6 lets the settings' CELERY_TASK_DEFAULT_QUEUE win over
# task_default_queue set here.
@app.task(name="bench.noop", queue=QUEUE)
def noop() -> None:
    """Nothing: what is left of a zero-work task without our claim and bookkeeping."""


CLAIM = """
UPDATE tasks_task SET status = 'running', attempts = attempts + 1
WHERE id = %(task)s AND status = 'queued' RETURNING attempts
"""
RECORD = """
UPDATE tasks_task SET status = 'completed'
WHERE id = %(task)s AND status = 'running' AND attempts = %(attempt)s RETURNING id
"""


@cache
def _database() -> psycopg.Connection:
    """This pool process's connection to the orchestrator's database (DATABASE_URL)."""
    db = _project_settings().DATABASES["default"]
    return psycopg.connect(
        dbname=db["NAME"], user=db["USER"], password=db["PASSWORD"], host=db["HOST"], port=db["PORT"], autocommit=True
    )


@app.task(name="bench.claim_and_record", queue=QUEUE)
def claim_and_record(task_id: str) -> None:
    """The floor's task: claim the queued task row, then record it completed."""
    cursor = _database().cursor()
    [(attempt,)] = cursor.execute(CLAIM, {"task": task_id}, prepare=True).fetchall()
    if not cursor.execute(RECORD, {"task": task_id, "attempt": attempt}, prepare=True).fetchall():
        raise RuntimeError(f"task {task_id}: the record found the claim gone")


def chain_canvas(steps: list[Signature]) -> Signature:
    return chain(*steps, app=app)


def fan_canvas(steps: list[Signature]) -> Signature:
    """root -> the rest in parallel -> sink, the shape our compiler gives a fan-out/fan-in."""
    root, *middle, sink = steps
    return chain(root, chord(group(middle), sink), app=app)


def noops(count: int) -> list[Signature]:
    return [noop.si() for _ in range(count)]


def claims(task_ids: list) -> list[Signature]:
    return [claim_and_record.si(str(task_id)) for task_id in task_ids]
