"""gunicorn's hooks for the web process (the Procfile and the Dockerfile start it with this file)."""

import os

from django.conf import settings

from orchestrator_project import metrics, telemetry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_project.settings")  # as wsgi.py does

# gunicorn's own lines (gunicorn.error: start, workers booting and dying; gunicorn.access: one
# per request, as an http.request event) go through the formatter of every other line
# (docs/LOGGING.md), so that in JSON the web process writes nothing else.
logconfig_dict = settings.LOGGING


def on_starting(server) -> None:
    # The master comes first: its workers inherit the group's metrics directory.
    metrics.prepare_group()


def post_fork(server, worker) -> None:
    telemetry.setup("web")


def worker_exit(server, worker) -> None:
    telemetry.shutdown()  # what the worker still batches


def child_exit(server, worker) -> None:
    metrics.mark_dead(worker.pid)
