import os

from celery import Celery
from celery.signals import (
    beat_embedded_init,
    beat_init,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from . import metrics, telemetry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_project.settings")

app = Celery("orchestrator_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def _set_up_pool_process(**kwargs) -> None:
    # After the fork: tracing's exporters hold threads and sockets that do not survive one.
    telemetry.setup("worker")


@worker_init.connect
def _set_up_worker_without_fork(sender=None, **kwargs) -> None:
    # A pool that does not fork runs the tasks in this very process and sends no
    # worker_process_init (solo sends one). Prefork, the default, sets up in each pool process.
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if name.split(":")[0].rsplit(".", 1)[-1] in ("threads", "thread", "gevent", "eventlet"):
        telemetry.setup("worker")


@beat_init.connect
@beat_embedded_init.connect
def _set_up_beat(**kwargs) -> None:
    telemetry.setup("beat")


@worker_process_shutdown.connect
def _pool_process_exits(**kwargs) -> None:
    metrics.mark_dead()
    # A pool process leaves with os._exit, past the SDK's atexit flush.
    telemetry.shutdown()


@worker_ready.connect
def _serve_metrics(sender=None, **kwargs) -> None:
    # The worker's main process serves the whole group (never a pool process: each would count
    # only itself); off unless METRICS_PORT is set.
    from django.conf import settings

    if settings.METRICS_PORT:
        metrics.serve_group(settings.METRICS_PORT, settings.METRICS_ADDRESS)
