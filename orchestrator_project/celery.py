import logging
import os

from celery import Celery
from celery.signals import (
    beat_embedded_init,
    beat_init,
    celeryd_after_setup,
    setup_logging,
    task_prerun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from . import logs, metrics, telemetry

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_project.settings")

app = Celery("orchestrator_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@setup_logging.connect
def _log_like_django(loglevel=None, **kwargs) -> None:
    # With a receiver here, Celery installs none of its own handlers (plain text on the root
    # logger) in the worker, its pool processes and Beat: they log through settings.LOGGING.
    # The command line's --loglevel still applies.
    from django.conf import settings

    logs.configure(settings.LOGGING)
    if loglevel:
        logging.getLogger().setLevel(loglevel)


@celeryd_after_setup.connect
def _no_banner_in_json(sender=None, instance=None, **kwargs) -> None:
    # The worker prints its banner straight to stdout; in JSON it is one line of fields instead.
    from django.conf import settings

    if settings.LOG_FORMAT == "json":
        instance.quiet = True
        queues = sorted(instance.app.amqp.queues.consume_from or ())
        logs.log.info("worker.starting", hostname=sender, queues=queues, concurrency=instance.concurrency)


@task_prerun.connect
def _fresh_log_context(task_id=None, task=None, **kwargs) -> None:
    # A pool process runs one task after another: nothing bound by the last may reach the next.
    logs.new_context(message_id=task_id, celery_task=getattr(task, "name", None))


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
