"""The baseline of B1: a bare Celery app whose task does nothing, on the orchestrator's broker.

Started as `celery -A bench.rawapp worker`. It takes its Celery settings from the project's
settings.py (acks_late, prefetch 1, priority queues, the Redis result backend), so that the
comparison measures our code, not a different Celery configuration.
"""

import importlib.util
from pathlib import Path

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


def chain_canvas(length: int) -> Signature:
    return chain(*(noop.si() for _ in range(length)), app=app)


def fan_canvas(width: int) -> Signature:
    """root -> `width` in parallel -> sink, the shape our compiler gives a fan-out/fan-in."""
    return chain(noop.si(), chord(group(noop.si() for _ in range(width)), noop.si()), app=app)
