"""The benchmark's own resources: a database, a Redis database and the environment its workers get.

They never overlap with `make up` (database orchestrator, Redis 0), the demo (Redis 1) or the
test suite (Redis 15), so a benchmark can run next to any of them.
"""

import os
import secrets
import subprocess
import sys
from pathlib import Path

from bench import BenchError

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"
DATABASE_URL = "postgres://postgres@127.0.0.1:5432/orchestrator_bench"
REDIS_URL = "redis://127.0.0.1:6379/3"
# An operator's broker or result backend would point our workers at shared queues.
FOREIGN_VARIABLES = ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")


# `--broker amqp`: RabbitMQ, in a vhost of the benchmark's own (ensure_services.py makes it).
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/orchestrator_bench"


def bench_environment(broker: str = "redis") -> dict[str, str]:
    """The variables every process of the benchmark runs with, this one included."""
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_VARIABLES}
    if broker == "amqp":
        env["CELERY_BROKER_URL"] = AMQP_URL
    env.update(
        DJANGO_SETTINGS_MODULE="orchestrator_project.settings",
        DATABASE_URL=DATABASE_URL,
        REDIS_URL=REDIS_URL,
        # Production mode: with DEBUG every process keeps a log of its SQL, which costs time per
        # query. The key only has to exist; nothing signed here outlives the run.
        DEBUG="false",
        SECRET_KEY=secrets.token_urlsafe(32),
        LOG_LEVEL="WARNING",
        ALLOWED_HOSTS="127.0.0.1",  # B4 calls the API in process, as this host
        # B1's fan is 500 tasks: the bench tenant's tasks-per-session quota is this setting's.
        MAX_TASKS_PER_SESSION="500",
        PYTHONUNBUFFERED="1",
    )
    return env


def prepare_services(env: dict[str, str]) -> None:
    """Start PostgreSQL and Redis if needed, create the bench database if missing, migrate it."""
    steps = (
        [sys.executable, str(ROOT / "scripts" / "ensure_services.py")],
        [sys.executable, str(ROOT / "manage.py"), "migrate", "--noinput", "-v0"],
    )
    for argv in steps:
        done = subprocess.run(argv, cwd=ROOT, env=env, check=False)
        if done.returncode != 0:
            raise BenchError(f"{' '.join(argv[1:3])} failed with exit code {done.returncode} (see above)")


def configure_django(env: dict[str, str]) -> None:
    """Point this process at the bench resources, then set Django up."""
    for name in FOREIGN_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update(env)
    import django

    django.setup()
