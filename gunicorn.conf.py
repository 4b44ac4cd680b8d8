"""gunicorn's hooks for the web process and the event streams' process (the Procfile and the
Dockerfile start both with this file)."""

import os

from django.conf import settings

from orchestrator_project import metrics, telemetry  # noqa: F401 - metrics: see below

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_project.settings")  # as wsgi.py does

# gunicorn's own lines (gunicorn.error: start, workers booting and dying; gunicorn.access: one
# per request, as an http.request event) go through the formatter of every other line
# (docs/LOGGING.md), so that in JSON the web process writes nothing else.
logconfig_dict = settings.LOGGING


# Importing metrics above made the master the first process of the web's group: a fresh metrics
# directory, which every worker it forks inherits (docs/OBSERVABILITY.md).


def post_fork(server, worker) -> None:
    # The streams' process runs uvicorn's ASGI worker (orchestrator_project/asgi.py).
    telemetry.setup("stream" if "uvicorn" in server.cfg.worker_class_str.lower() else "web")


def worker_exit(server, worker) -> None:
    telemetry.shutdown()  # what the worker still batches
