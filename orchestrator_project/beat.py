"""Beat's scheduler: django-celery-beat's DatabaseScheduler, sending only while it leads.

Two Beat processes (a rolling deploy, an operator's mistake) would each send every periodic
task. LeaderScheduler sends only while it holds the Redis lock `beat:leader` (a FairLock),
extended on every tick; the other Beat keeps trying and takes over once the leader stops or its
lease runs out. Its sweeps are compare-and-sets besides, so even a late message from a former
leader changes nothing twice.
"""

import logging
import os
import socket
from contextlib import suppress

import redis
from django.conf import settings
from django_celery_beat.schedulers import DatabaseScheduler

from orchestrator_project.locking import FairLock, LockUnavailable, NotLockOwner

logger = logging.getLogger(__name__)


class LeaderScheduler(DatabaseScheduler):
    def __init__(self, *args, **kwargs) -> None:
        ttl = settings.BEAT_LEADER_TTL_SECONDS
        self._leader = FairLock("beat:leader", ttl=ttl, owner=f"beat:{socket.gethostname()}:{os.getpid()}")
        self._leading = False
        # Ticks come at least this often, so the lease is extended well before it runs out.
        self._tick_at_most = ttl / 3
        super().__init__(*args, **kwargs)

    def tick(self, *args, **kwargs) -> float:
        if not self._lead():
            return self._tick_at_most
        return min(super().tick(*args, **kwargs), self._tick_at_most)

    def _lead(self) -> bool:
        try:
            return self._try_to_lead()
        except redis.RedisError as exc:
            # Redis is down or restarting: no Beat can tell who leads, and the broker (Redis too)
            # takes no message. Send nothing; lead again once the lock can be held.
            if self._leading:
                logger.warning("beat: cannot reach Redis (%s); sending nothing until it answers", exc)
            self._leading = False
            return False

    def _try_to_lead(self) -> bool:
        if self._leading:
            try:
                self._leader.extend()
                return True
            except NotLockOwner:
                logger.warning("beat: lost the leader lock (its lease ran out); another Beat may lead now")
                self._leading = False
        try:
            self._leader.acquire(timeout=0)
        except LockUnavailable:
            return False
        logger.info("beat: this Beat leads and sends the periodic tasks")
        self._leading = True
        return True

    def close(self) -> None:
        if self._leading:
            with suppress(NotLockOwner, redis.RedisError):  # the other Beat takes over at its next tick
                self._leader.release()
            self._leading = False
        super().close()
