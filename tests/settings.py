"""Test settings: the real settings module, pointed at a Redis database of its own.

The environment is adjusted before the real settings read it, so that the Celery worker
processes the tests start (which read the same variables) agree with the test process.
"""

import os

os.environ.setdefault("DEBUG", "true")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/orchestrator")
os.environ["REDIS_URL"] = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
# pytest-xdist's workers (`make test-fast` runs two, gw0 and gw1): each its own Redis database
# (15, 14, ...) as each has its own test database (pytest-django adds the worker's name to it).
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and _worker[2:].isdigit():
    _base, _, _db = os.environ["REDIS_URL"].rpartition("/")
    os.environ["REDIS_URL"] = f"{_base}/{int(_db) - int(_worker[2:])}"
# `make test` runs the tests that depend on the broker a second time on RabbitMQ, with
# TEST_BROKER_URL (an amqp:// URL with a vhost of the tests' own; conftest.py picks the tests).
# Under pytest-xdist, each worker its own vhost (the URL's, with the worker's name appended),
# made empty before every test (conftest.py's clean_redis).
if os.environ.get("TEST_BROKER_URL"):
    os.environ["CELERY_BROKER_URL"] = os.environ["TEST_BROKER_URL"] + (f"_{_worker}" if _worker else "")
else:
    os.environ.pop("CELERY_BROKER_URL", None)
os.environ.pop("CELERY_RESULT_BACKEND", None)
os.environ.setdefault("AGENT_HEARTBEAT_SECONDS", "1")
os.environ.setdefault("TASK_DEADLINE_SECONDS", "120")
os.environ.setdefault("TASK_LEASE_SECONDS", "4")
os.environ.setdefault("LOST_MESSAGE_AFTER_SECONDS", "3")

from orchestrator_project.settings import *  # noqa: E402, F403 - after the environment is set

# Out of the way of every test but tests/test_throttling.py, which sets its own.
REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] = {"user": "100000/min", "tenant": "100000/min", "auth_failures": "100000/min"}  # noqa: F405
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STATIC_ROOT = None  # the tests serve no collected static files; WhiteNoise would warn it is missing
