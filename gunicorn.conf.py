"""gunicorn's hooks for the web process (the Procfile and the Dockerfile start it with this file)."""

from orchestrator_project import metrics, telemetry


def on_starting(server) -> None:
    # The master comes first: its workers inherit the group's metrics directory.
    metrics.prepare_group()


def post_fork(server, worker) -> None:
    telemetry.setup("web")


def worker_exit(server, worker) -> None:
    telemetry.shutdown()  # what the worker still batches


def child_exit(server, worker) -> None:
    metrics.mark_dead(worker.pid)
