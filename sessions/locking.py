"""The per-session lock every transition takes, and the fencing token that comes with it."""

from collections.abc import Iterator
from contextlib import contextmanager, suppress

from django.conf import settings

from orchestrator_project import metrics
from orchestrator_project.locking import FairLock, NotLockOwner, StaleFencingToken


class SessionLease:
    """The held session lock and its fencing token."""

    def __init__(self, lock: FairLock) -> None:
        self._lock = lock
        self.token: int = lock.token

    def check_against(self, stored: int) -> int:
        """The token to write over a row that holds `stored`; raises if we are a stale holder.

        A token at or below the stored one means either that our lease expired and a newer
        holder wrote (we no longer own the lock: reject), or that Redis lost the counter while
        we still own the lock (re-base the counter above the row and go on).
        """
        if self.token > stored:
            return self.token
        try:
            self.token = self._lock.rebase(stored)
        except NotLockOwner as exc:
            metrics.FENCING_REJECTIONS.labels("session", "transition").inc()
            raise StaleFencingToken(f"token {self.token} is not newer than {stored} and the lease has expired") from exc
        return self.token


@contextmanager
def session_lock(session_id) -> Iterator[SessionLease]:
    ttl = settings.SESSION_LOCK_TTL_SECONDS
    lock = FairLock(f"session:{session_id}", ttl=ttl)
    lock.acquire(timeout=ttl)
    try:
        yield SessionLease(lock)
    finally:
        # If the lease ran out while we held it, the fencing token already protected the row.
        with suppress(NotLockOwner):
            lock.release()
