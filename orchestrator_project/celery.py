import os

from celery import Celery

# Each connects its receivers to Celery's signals: logs (Celery logs through settings.LOGGING),
# metrics (a worker serves its group's), telemetry (tracing set up after the fork).
from . import logs, metrics, telemetry  # noqa: F401

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator_project.settings")

app = Celery("orchestrator_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
