"""The Celery tasks the engine sends by name (tasks/messages.py) are registered in every process,
the web's included, so that a message by name is sent with its task's own options."""

import json
import os
import subprocess
import sys

from orchestrator_project.schedules import SCHEDULES
from tasks import messages
from tests.conftest import ROOT

PROBE = """
import json
import django
django.setup()
from celery import current_app
from tasks import messages
run_task = current_app.tasks.get(messages.RUN_TASK)
print(json.dumps({
    "registered": sorted(name for name in current_app.tasks if not name.startswith("celery.")),
    "run_task_ignores_its_result": getattr(run_task, "ignore_result", None),
}))
"""


def test_a_fresh_django_process_registers_every_task_sent_by_name_or_scheduled():
    # A process that only sets Django up, as the web process does: it imports no task module itself.
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
    )

    seen = json.loads(done.stdout.strip().splitlines()[-1])
    sent_by_name = {messages.RUN_TASK, messages.DISPATCH_SESSION, messages.FINALIZE_SESSION}
    scheduled = {spec["task"] for spec in SCHEDULES}
    assert sent_by_name | {messages.MARK_SESSION_RUNNING} | scheduled <= set(seen["registered"])
    assert seen["run_task_ignores_its_result"] is True
