"""The per-session lock that every transition takes before it touches the row.

A redis-py lock gives mutual exclusion with a lease; a per-session counter gives each holder a
monotonic fencing token that the row stores, so a holder that stalls past its lease cannot
overwrite the write of the holder that came after it.
"""

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cache

import redis
from django.conf import settings
from redis.exceptions import LockError


class LockUnavailable(Exception):
    """The session lock could not be acquired in time (another transition holds it)."""


@cache
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, health_check_interval=30)


@contextmanager
def session_lock(session_id) -> Iterator[int]:
    client = redis_client()
    ttl = settings.SESSION_LOCK_TTL_SECONDS
    lock = client.lock(f"lock:session:{session_id}", timeout=ttl, blocking_timeout=ttl)
    if not lock.acquire():
        raise LockUnavailable(f"session {session_id} is locked by another transition")
    try:
        yield client.incr(f"fence:session:{session_id}")
    finally:
        # If the lease ran out while we held it, the fencing token already protected the row.
        with suppress(LockError):
            lock.release()
