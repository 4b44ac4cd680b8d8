"""Liveness answers without dependencies; readiness checks PostgreSQL, Redis and the broker for real,
and names the one that is down."""

import pytest

from orchestrator_project.celery import app
from orchestrator_project.redis_client import redis_client

UNREACHABLE = "redis://127.0.0.1:1/0"


@pytest.fixture
def unreachable_redis(settings):
    settings.REDIS_URL = UNREACHABLE
    redis_client.cache_clear()
    yield
    # The settings fixture restores REDIS_URL after this; the next redis_client() call rebuilds.
    redis_client.cache_clear()


@pytest.fixture
def unreachable_broker(settings):
    # The Celery app reads Django's settings once, lazily, and the readiness check uses the
    # app's view: read the real URL first (that finalizes the configuration), then break both.
    good = app.conf.broker_url
    settings.CELERY_BROKER_URL = UNREACHABLE
    app.conf.broker_url = UNREACHABLE
    try:
        yield
    finally:
        # Both, here: Celery 5.6 reads the Django setting before its own conf.
        settings.CELERY_BROKER_URL = good
        app.conf.broker_url = good
    assert app.conf.broker_write_url == good


def test_live_is_200_without_authentication(client):
    response = client.get("/health/live/")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_is_200_when_database_redis_and_broker_answer(client, db):
    response = client.get("/health/ready/")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok", "broker": "ok"}}


@pytest.mark.parametrize(
    ("outage", "down", "says"),
    [("unreachable_redis", "redis", "ConnectionError"), ("unreachable_broker", "broker", "error: ")],
)
def test_ready_is_503_naming_the_dependency_that_is_down(client, db, request, outage, down, says):
    request.getfixturevalue(outage)

    response = client.get("/health/ready/")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert all(state == "ok" for check, state in body["checks"].items() if check != down)
    assert body["checks"][down].startswith("error: ")
    assert says in body["checks"][down]


def test_ready_recovers_once_redis_is_back(client, db, settings):
    good = settings.REDIS_URL
    settings.REDIS_URL = UNREACHABLE
    redis_client.cache_clear()
    try:
        assert client.get("/health/ready/").status_code == 503
    finally:
        settings.REDIS_URL = good
        redis_client.cache_clear()

    response = client.get("/health/ready/")
    assert response.status_code == 200, response.json()


def test_live_stays_200_when_redis_is_unreachable(client, unreachable_redis):
    assert client.get("/health/live/").status_code == 200
