"""Prometheus metrics: what the processes count, and how each group of processes serves them.

Every process counts into prometheus_client's multiprocess files (one directory per process group:
gunicorn's master and its workers, a Celery worker and its pool processes), so that a scrape sums
the whole group whichever process answers it. The group's first process makes the directory
(`prepare_group`), fresh, and removes those of groups whose first process is gone. A process of
the group that dies leaves its files, and its counts stay in the sum: a rate must not see a false
reset. (prometheus_client's mark_process_dead would remove only "live" gauges, and we keep none:
the state that lives in the database is read at scrape time.) The web serves `/metrics`
(api/metrics.py, with that state); a Celery worker's main process serves its group on
METRICS_PORT (`serve_group`), never a pool process (each would count only itself).

No session or task ids as labels: those are in the logs and the traces. docs/OBSERVABILITY.md
lists every metric.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"


def enabled() -> bool:
    """METRICS_ENABLED=false: no files and no server; what the code counts stays in each
    process's memory, unread (make bench measures what metrics cost against this)."""
    return os.environ.get("METRICS_ENABLED", "true").strip().lower() not in ("false", "0", "no", "off")


def metrics_root() -> Path:
    return Path(os.environ.get("METRICS_DIR") or Path(tempfile.gettempdir()) / "orchestrator-metrics")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_group() -> Path | None:
    """Give the process group started by this process a fresh multiprocess directory
    and point PROMETHEUS_MULTIPROC_DIR at it, for this process and the ones it starts, before
    any of our metrics is created. Directories of groups whose first process has died are
    removed."""
    if not enabled():
        return None
    root = metrics_root()
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.name.isdigit() and not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    group = root / str(os.getpid())
    shutil.rmtree(group, ignore_errors=True)
    group.mkdir()
    os.environ[ENV] = str(group)
    if "prometheus_client.values" in sys.modules:
        # Imported already (Celery's command line loads Flower's plugin, which imports it): it
        # chose its values for a single process; metrics created from now on count in the files.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
    return group


def ensure_group() -> None:
    """A process that no group's first process started is the first of its own group."""
    if not os.environ.get(ENV) or not Path(os.environ[ENV]).is_dir():
        prepare_group()


# Before any metric is created: prometheus_client picks its kind of values when it is imported.
ensure_group()

from celery.signals import worker_ready  # noqa: E402
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess  # noqa: E402


def group_registry() -> CollectorRegistry:
    """A registry that reads every process of this group's files."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


@worker_ready.connect
def serve_group(sender=None, **kwargs) -> None:
    """A Celery worker's main process serves its whole group on METRICS_ADDRESS:METRICS_PORT
    (never a pool process: each would count only itself); off unless METRICS_PORT is set."""
    from django.conf import settings
    from prometheus_client import start_http_server

    if enabled() and settings.METRICS_PORT:
        start_http_server(settings.METRICS_PORT, addr=settings.METRICS_ADDRESS, registry=group_registry())


# Sessions
SESSION_TRANSITIONS = Counter("orch_session_transitions", "Session status transitions.", ["from_status", "to_status"])

# Tasks. Schedule-to-start has a bucket at exactly 60 s: the SLO "tasks start within 60 s of
# being ready" is read from it.
TASK_SCHEDULE_TO_START = Histogram(
    "orch_task_schedule_to_start_seconds",
    "From a task being ready (queued) to an agent starting it.",
    ["capability"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)
TASK_DURATION = Histogram(
    "orch_task_duration_seconds",
    "How long an agent ran a task, by how it ended.",
    ["capability", "executor", "outcome"],
    buckets=(0.01, 0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
TASKS_FINISHED = Counter(
    "orch_tasks_finished",
    "Tasks that reached an end, by outcome and whose doing a failure or cancellation was "
    "(cause: none for completed and skipped, agent, orchestrator, user).",
    ["capability", "executor", "outcome", "cause"],
)
FENCING_REJECTIONS = Counter(
    "orch_fencing_rejections",
    "Writes refused because a newer attempt or lock holder had taken over.",
    ["resource", "operation"],
)

# Locks
LOCK_WAIT = Histogram(
    "orch_lock_wait_seconds",
    "Time spent waiting to acquire a lock (acquired or not).",
    ["lock"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LOCK_ACQUIRE_FAILURES = Counter("orch_lock_acquire_failures", "Lock acquisitions that gave up.", ["lock", "reason"])

# Beat's sweeps
SWEEP_REPAIRS = Counter("orch_sweep_repairs", "What each sweep repaired, by kind.", ["sweep", "kind"])
SWEEP_LAST_SUCCESS = Gauge(
    "orch_sweep_last_success_timestamp_seconds",
    "When each sweep last finished without an error (Unix time).",
    ["sweep"],
    multiprocess_mode="mostrecent",
)

# Agents
HEARTBEATS = Counter("orch_agent_heartbeats", "Heartbeats recorded, by agent.", ["agent"])
SANDBOX_REFUSALS = Counter(
    "orch_sandbox_refusals", "Agent processes the sandbox refused to start, by reason.", ["reason"]
)


# The label values known in advance start at 0, so that a rate or an alert over them sees a 0
# rather than no series at all until the first one happens.
for _resource, _operation in (("task", "record"), ("session", "transition")):
    FENCING_REJECTIONS.labels(_resource, _operation)
for _lock in ("session", "repository"):  # the kinds of FairLock a scraped process takes
    for _reason in ("timeout", "deadlock"):
        LOCK_ACQUIRE_FAILURES.labels(_lock, _reason)
for _reason in ("egress", "tools_missing", "no_free_uid"):
    SANDBOX_REFUSALS.labels(_reason)
