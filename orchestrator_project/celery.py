import os

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

from . import metrics, telemetry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_project.settings")

app = Celery("orchestrator_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def _set_up_pool_process(**kwargs) -> None:
    # After the fork: tracing's exporters hold threads and sockets that do not survive one.
    telemetry.setup("worker")


@worker_process_shutdown.connect
def _pool_process_exits(**kwargs) -> None:
    metrics.mark_dead()


@worker_ready.connect
def _serve_metrics(sender=None, **kwargs) -> None:
    # The worker's main process serves the whole group (never a pool process: each would count
    # only itself); off unless METRICS_PORT is set.
    from django.conf import settings

    if settings.METRICS_PORT:
        metrics.serve_group(settings.METRICS_PORT, settings.METRICS_ADDRESS)
