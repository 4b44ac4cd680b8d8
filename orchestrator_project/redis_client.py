"""The Redis client every process shares: locks, circuit breakers, abort signals, events."""

from functools import cache

import redis
from django.conf import settings


@cache
def redis_client() -> redis.Redis:
    # Timeouts: no call of ours blocks on the server, so one that hangs (a half-open connection)
    # fails and is retried instead of holding a claimed task forever.
    timeouts = {"socket_timeout": 10, "socket_connect_timeout": 5}
    return redis.Redis.from_url(settings.REDIS_URL, health_check_interval=30, **timeouts)
