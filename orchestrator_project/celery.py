import logging
import os

from celery import Celery
from celery.signals import (
    celeryd_after_setup,
    setup_logging,
    task_prerun,
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
