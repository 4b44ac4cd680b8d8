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
from redis.lock import Lock


class LockUnavailable(Exception):
    """The session lock could not be acquired in time (another transition holds it)."""


@cache
def redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, health_check_interval=30)


# Raise the counter to at least ARGV[1], then take the next token: used when Redis lost the
# counter (a restart without persistence) and it restarted below the token the row stores.
_RAISE_AND_INCR = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return redis.call('INCR', KEYS[1])
"""


class StaleFencingToken(Exception):
    """A lock holder whose lease expired tried to write after a newer holder."""


class SessionLease:
    """The held session lock and its fencing token."""

    def __init__(self, client: redis.Redis, lock: Lock, session_id) -> None:
        self._client = client
        self._lock = lock
        self._fence_key = f"fence:session:{session_id}"
        self.token: int = client.incr(self._fence_key)

    def check_against(self, stored: int) -> int:
        """The token to write over a row that holds `stored`; raises if we are a stale holder.

        A token at or below the stored one means either that our lease expired and a newer
        holder wrote (we no longer own the lock: reject), or that Redis lost the counter while
        we still own the lock (re-base the counter above the row and go on).
        """
        if self.token > stored:
            return self.token
        if not self._lock.owned():
            raise StaleFencingToken(f"token {self.token} is not newer than {stored} and the lease has expired")
        self.token = int(self._client.eval(_RAISE_AND_INCR, 1, self._fence_key, stored))
        return self.token


@contextmanager
def session_lock(session_id) -> Iterator[SessionLease]:
    client = redis_client()
    ttl = settings.SESSION_LOCK_TTL_SECONDS
    lock = client.lock(f"lock:session:{session_id}", timeout=ttl, blocking_timeout=ttl)
    if not lock.acquire():
        raise LockUnavailable(f"session {session_id} is locked by another transition")
    try:
        yield SessionLease(client, lock, session_id)
    finally:
        # If the lease ran out while we held it, the fencing token already protected the row.
        with suppress(LockError):
            lock.release()
