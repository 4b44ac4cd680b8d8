"""Liveness (the process answers) and readiness (its dependencies answer)."""

from django.db import connection
from django.http import JsonResponse

from orchestrator_project.redis_client import redis_client

from .celery import app


def live(request):
    return JsonResponse({"status": "ok"})


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


def _check_redis() -> None:
    redis_client().ping()


def _check_broker() -> None:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def ready(request):
    checks = {"database": _check_database, "redis": _check_redis, "broker": _check_broker}
    results = {}
    for name, check in checks.items():
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            results[name] = f"error: {exc.__class__.__name__}"
    healthy = all(value == "ok" for value in results.values())
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", "checks": results}, status=200 if healthy else 503
    )
