"""A fair, fenced lock on Redis: one owner at a time per resource, in the order they asked.

`FairLock` is a few Lua scripts, each atomic in Redis:

- waiters queue in FIFO order; a free lock goes to the head of the queue, never to a newcomer;
- each waiter has a deadline in the queue that it renews while it waits, so a waiter that died
  is dropped once its deadline passes instead of blocking the queue;
- the holder has a lease (TTL) that it can extend; the lock is free once the lease runs out;
- every acquisition gets the next fencing token of the resource: a number that only grows, which
  the guarded row stores, so a holder that stalled past its lease cannot overwrite the write of
  the holder that came after it (sessions.locking.SessionLease);
- the same owner may acquire again (re-entrancy); it must release as often;
- only the owner can release or extend;
- a request that would close a cycle in the wait-for graph (A holds X and waits for Y, whose
  holder waits for X) fails at once with DeadlockDetected, naming the cycle.

The scripts read keys of other resources while walking the wait-for graph, which a standalone
Redis (what the project uses) allows and Redis Cluster does not. See docs/CONCURRENCY.md.
"""

import os
import socket
import threading
import time
from functools import cache

import redis

from . import metrics
from .redis_client import redis_client


class LockUnavailable(Exception):
    """The lock could not be acquired in time (another owner holds it, or waiters came first)."""


class DeadlockDetected(LockUnavailable):
    """Waiting for the lock would close a cycle of owners waiting for each other."""


class NotLockOwner(Exception):
    """Release or extend by an owner that does not hold the lock (any more)."""


class StaleFencingToken(Exception):
    """A lock holder whose lease expired tried to write after a newer holder."""


# Script preludes: Redis's clock in ms as `now`; and, for KEYS[1] a lock's hash and ARGV[1] an
# owner, return 0 unless that owner holds the lock and its lease has not run out.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
_HELD_BY_OWNER = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'expires')
if h[1] ~= ARGV[1] or tonumber(h[2]) <= now then return 0 end
"""

# KEYS: the lock's hash, its queue, its waiters' deadlines, its fencing counter, the wait-for
# graph (owner -> the resource it waits for). ARGV: resource, owner, lease ms, queue deadline ms.
# Returns {'acquired', token, count}, {'queued', position} or {'deadlock', cycle}.
_ACQUIRE = (
    _NOW
    + """
local resource, owner, ttl, patience = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

local function holder_of(key)
  local h = redis.call('HMGET', key, 'owner', 'expires')
  if h[1] and tonumber(h[2]) > now then return h[1] end
  return false
end

for _, waiter in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('LREM', KEYS[2], 0, waiter)
  redis.call('ZREM', KEYS[3], waiter)
  if redis.call('HGET', KEYS[5], waiter) == resource then redis.call('HDEL', KEYS[5], waiter) end
end

local holder = holder_of(KEYS[1])
if holder == owner then
  local count = redis.call('HINCRBY', KEYS[1], 'count', 1)
  redis.call('HSET', KEYS[1], 'expires', now + ttl)
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  return {'acquired', tonumber(redis.call('HGET', KEYS[1], 'token')), count}
end
if not holder then
  local head = redis.call('LINDEX', KEYS[2], 0)
  if not head or head == owner then
    if head then redis.call('LPOP', KEYS[2]) end
    redis.call('ZREM', KEYS[3], owner)
    redis.call('HDEL', KEYS[5], owner)
    local token = redis.call('INCR', KEYS[4])
    redis.call('HSET', KEYS[1], 'owner', owner, 'count', 1, 'token', token, 'expires', now + ttl)
    redis.call('PEXPIRE', KEYS[1], 2 * ttl)
    return {'acquired', token, 1}
  end
else
  local cycle, who = {owner, resource}, holder
  for _ = 1, 64 do
    table.insert(cycle, who)
    if who == owner then return {'deadlock', table.concat(cycle, ' -> ')} end
    local wanted = redis.call('HGET', KEYS[5], who)
    if not wanted then break end
    table.insert(cycle, wanted)
    who = holder_of('lock:' .. wanted)
    if not who then break end
  end
end
if not redis.call('ZSCORE', KEYS[3], owner) then redis.call('RPUSH', KEYS[2], owner) end
redis.call('ZADD', KEYS[3], now + patience, owner)
redis.call('HSET', KEYS[5], owner, resource)
return {'queued', redis.call('LPOS', KEYS[2], owner)}
"""
)

# KEYS: the lock's hash, its queue. ARGV: owner. Returns the holds left (0: free), or -1 when
# the owner does not hold the lock. A free lock wakes the waiter at the head of the queue.
_RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'count')
if h[1] ~= ARGV[1] then return -1 end
local count = tonumber(h[2]) - 1
if count > 0 then
  redis.call('HSET', KEYS[1], 'count', count)
  return count
end
redis.call('DEL', KEYS[1])
local head = redis.call('LINDEX', KEYS[2], 0)
if head then
  local wake = KEYS[1] .. ':wake:' .. head
  redis.call('LPUSH', wake, 1)
  redis.call('PEXPIRE', wake, 60000)
end
return 0
"""

# KEYS: the lock's hash. ARGV: owner, lease ms. 1 if the owner's lease was extended, else 0.
_EXTEND = (
    _NOW
    + _HELD_BY_OWNER
    + """
redis.call('HSET', KEYS[1], 'expires', now + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return 1
"""
)

# KEYS: the lock's queue, its waiters' deadlines, the wait-for graph. ARGV: owner, resource.
_LEAVE_QUEUE = """
redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[3], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[3], ARGV[1]) end
return 1
"""

# KEYS: the lock's hash, its fencing counter. ARGV: owner, a token the guarded row stores.
# For a holder whose counter Redis lost (a restart without persistence): raise the counter
# above the stored token and take the next one. 0 if the owner no longer holds the lock.
_REBASE = (
    _NOW
    + _HELD_BY_OWNER
    + """
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
if current < tonumber(ARGV[2]) then redis.call('SET', KEYS[2], ARGV[2]) end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'token', token)
return token
"""
)

WAIT_FOR_GRAPH = "locks:waiting"


def default_owner() -> str:
    """This thread of this process on this host: the owner that re-enters its own locks."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class FairLock:
    """A lock on `resource` (see the module's docstring). Use as a context manager, or call
    acquire() and release(). `ttl` is the lease in seconds; `patience` is how long a waiter that
    stops renewing its place (it died) keeps it."""

    def __init__(
        self,
        resource: str,
        *,
        ttl: float,
        owner: str | None = None,
        patience: float = 3.0,
        client: redis.Redis | None = None,
    ) -> None:
        self.resource = resource
        self.owner = owner or default_owner()
        self.ttl_ms = max(1, int(ttl * 1000))
        self.patience_ms = max(1, int(patience * 1000))
        self.client = client or redis_client()
        self.key = f"lock:{resource}"
        # What the metrics call the lock: its kind ("session" for "session:<id>"), never an id.
        self.kind = resource.split(":", 1)[0]
        self.token: int | None = None
        self._scripts = _scripts(self.client)

    def acquire(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for the lock, in FIFO order; returns the fencing token.
        Raises LockUnavailable when the time runs out, DeadlockDetected at once."""
        keys = [self.key, f"{self.key}:queue", f"{self.key}:deadlines", f"{self.key}:fence", WAIT_FOR_GRAPH]
        args = [self.resource, self.owner, self.ttl_ms, self.patience_ms]
        started = time.monotonic()
        deadline = started + timeout
        while True:
            status, value, *_ = self._scripts["acquire"](keys=keys, args=args)
            status = status.decode()
            if status == "acquired":
                metrics.LOCK_WAIT.labels(self.kind).observe(time.monotonic() - started)
                self.token = int(value)
                return self.token
            if status == "deadlock":
                self._leave_queue()
                self._gave_up("deadlock", started)
                raise DeadlockDetected(f"waiting for {self.resource} would deadlock: {value.decode()}")
            left = deadline - time.monotonic()
            if left <= 0:
                self._leave_queue()
                self._gave_up("timeout", started)
                raise LockUnavailable(f"{self.resource} is held by another owner")
            # Woken by the release that makes us the head of the queue; meanwhile come back
            # often enough to renew our place (and to see a holder whose lease ran out).
            self.client.blpop([f"{self.key}:wake:{self.owner}"], timeout=min(left, self.patience_ms / 3000))

    def release(self) -> None:
        left = self._scripts["release"](keys=[self.key, f"{self.key}:queue"], args=[self.owner])
        if left < 0:
            raise NotLockOwner(f"{self.owner} does not hold {self.resource}")

    def extend(self, ttl: float | None = None) -> None:
        """Renew the lease for `ttl` seconds (the lock's ttl by default) from now."""
        ms = self.ttl_ms if ttl is None else max(1, int(ttl * 1000))
        if not self._scripts["extend"](keys=[self.key], args=[self.owner, ms]):
            raise NotLockOwner(f"{self.owner} does not hold {self.resource}")

    def rebase(self, stored: int) -> int:
        """A token above `stored` (a token the guarded row holds), for a holder whose fencing
        counter Redis lost. Raises NotLockOwner if the lease ran out."""
        token = self._scripts["rebase"](keys=[self.key, f"{self.key}:fence"], args=[self.owner, stored])
        if not token:
            raise NotLockOwner(f"{self.owner} no longer holds {self.resource}")
        self.token = int(token)
        return self.token

    def _gave_up(self, reason: str, started: float) -> None:
        metrics.LOCK_WAIT.labels(self.kind).observe(time.monotonic() - started)
        metrics.LOCK_ACQUIRE_FAILURES.labels(self.kind, reason).inc()

    def _leave_queue(self) -> None:
        self._scripts["leave_queue"](
            keys=[f"{self.key}:queue", f"{self.key}:deadlines", WAIT_FOR_GRAPH], args=[self.owner, self.resource]
        )

    def __enter__(self) -> "FairLock":
        self.acquire(timeout=self.ttl_ms / 1000)
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@cache
def _scripts(client: redis.Redis) -> dict:
    sources = {
        "acquire": _ACQUIRE,
        "release": _RELEASE,
        "extend": _EXTEND,
        "leave_queue": _LEAVE_QUEUE,
        "rebase": _REBASE,
    }
    return {name: client.register_script(source) for name, source in sources.items()}
