"""Reading the feed (models.FeedEvent) for the live event streams and pages: where a reader is,
what comes next, and the wake-up that tells the stream processes to look.

Why not `id > last`: ids come from a sequence when a row is inserted, but transactions commit in
another order. A reader that saw event 8 may see event 7 only later (its transaction was still
open), and `id > 8` would skip it for good. So a reader's position is a PostgreSQL snapshot
(pg_current_snapshot(): which transactions had committed when it read). The events after a
position are those written by a transaction that the newer snapshot sees committed and the
position's did not (pg_visible_in_snapshot on the event's txid): nothing committed later can
fall behind a position, and nothing is read twice.

A batch (the events between two snapshots) is delivered in id order, and may be long; a position
can point inside one: (seen, batch, last) means everything visible in `seen` was delivered, and
of what `batch` adds, the events up to id `last`. Each event's position is its SSE id, so a
client that reconnects with Last-Event-ID continues after exactly the event it saw last.

After a change commits, `announce` publishes the session's id on the tenant's Redis channel;
the stream processes wake their readers of that tenant, which read from the database. Pub/sub
is only the bell: a lost message delays an event until the next poll, never loses it.
"""

import functools
import itertools
import logging
import os
import queue
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from opentelemetry.instrumentation.utils import suppress_instrumentation

from orchestrator_project.redis_client import redis_client

logger = logging.getLogger(__name__)

CHANNEL_PREFIX = "io:feed:"
# What a stream or a timeline shows of a task's error, cut after redaction: the feed keeps 2,000
# characters, so that a credential that crosses this length is still recognised whole first.
ERROR_SHOWN = 500
# A pg_snapshot as text: xmin:xmax:xip,xip,... (ASCII digits only; checked further in _snapshot).
_SNAPSHOT = re.compile(r"([0-9]{1,19}):([0-9]{1,19}):((?:[0-9]{1,19},)*[0-9]{1,19})?", re.ASCII)
_ID = re.compile(r"[0-9]{1,18}", re.ASCII)
# The longest position a client may send: two snapshots, each listing the transactions in
# progress (at most max_connections of them, 20 characters each).
MAX_POSITION_LENGTH = 16384


def stream_base(request) -> str:
    """Where the browser that sent `request` reaches the event streams (settings.STREAM_URL):
    "" for this origin, a URL as configured, or ":PORT" on the host the page came from (a
    cookie is sent to any port of its host)."""
    if settings.STREAM_URL.startswith(":"):
        host = request.get_host()
        if not host.endswith("]"):  # an IPv6 literal without a port ends so
            host = host.rpartition(":")[0] or host
        return f"{request.scheme}://{host}{settings.STREAM_URL}"
    return settings.STREAM_URL


def channel(tenant_id) -> str:
    return f"{CHANNEL_PREFIX}{tenant_id}"


class _Announcer:
    """Publishes announcements from a thread of the process's own, a few milliseconds after they
    are made, several in one round trip to Redis and each (tenant, session) once: a task's claim
    and outcome are announced on the hot path, which must not wait for Redis."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, tenant_id, session_id) -> None:
        if self._thread is None or not self._thread.is_alive():  # none yet, or a forked child's copy
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="feed-announcer", daemon=True)
                    self._thread.start()
        self._queue.put((tenant_id, str(session_id)))

    def _run(self) -> None:
        # A bell, not work of its own: no trace of its own either (a root span per publish).
        with suppress_instrumentation():
            self._publish_forever()

    def _publish_forever(self) -> None:
        while True:
            pending = {self._queue.get()}
            time.sleep(ANNOUNCE_DELAY_S)  # what the same burst of work adds comes along
            while not self._queue.empty():
                pending.add(self._queue.get())
            try:
                with redis_client().pipeline(transaction=False) as pipe:
                    for tenant_id, session_id in pending:
                        pipe.publish(channel(tenant_id), session_id)
                    pipe.execute()
            except Exception:
                logger.warning("could not announce %d changes", len(pending), exc_info=True)


_ANNOUNCER = _Announcer()


def _fresh_announcer() -> None:
    global _ANNOUNCER
    _ANNOUNCER = _Announcer()  # a forked child (a pool process) starts with its own, empty


os.register_at_fork(after_in_child=_fresh_announcer)
# How long an announcement waits for others to go with it.
ANNOUNCE_DELAY_S = 0.005


def announce(tenant_id, session_id) -> None:
    """Wake the stream readers of the tenant (after a change has committed), within a few
    milliseconds. Best effort: the streams read the feed every STREAM_POLL_SECONDS anyway."""
    _ANNOUNCER.put(tenant_id, session_id)


class BadPosition(ValueError):
    """A position a client sent that is not one of ours."""


@dataclass(frozen=True)
class Position:
    seen: str | None  # a snapshot: every event visible in it was delivered (None: no event was)
    batch: str | None = None  # the snapshot of the batch being delivered
    last: int = 0  # of that batch, the events up to this id were delivered

    def encode(self) -> str:
        if self.batch is None:
            return self.seen or ""
        return f"{self.seen or ''}~{self.batch}~{self.last}"

    @classmethod
    def parse(cls, text: str) -> "Position":
        """A position a client sent back, checked as PostgreSQL would check its snapshots, so that
        a bad one is a 400 before the stream starts rather than an error after."""
        if len(text) > MAX_POSITION_LENGTH:
            raise BadPosition("the position is too long")
        parts = text.split("~")
        if len(parts) == 1:
            return cls(seen=_snapshot(parts[0]))
        if len(parts) == 3 and _ID.fullmatch(parts[2]):
            return cls(seen=_snapshot(parts[0]) if parts[0] else None, batch=_snapshot(parts[1]), last=int(parts[2]))
        raise BadPosition(f"not a stream position: {text[:80]!r}")


def _snapshot(text: str) -> str:
    match = _SNAPSHOT.fullmatch(text)
    if match is None:
        raise BadPosition(f"not a stream position: {text[:80]!r}")
    xmin, xmax = int(match[1]), int(match[2])
    xip = [int(xid) for xid in match[3].split(",")] if match[3] else []
    in_order = all(a < b for a, b in itertools.pairwise(xip))
    if not (1 <= xmin <= xmax < 2**63 and in_order and all(xmin <= xid < xmax for xid in xip)):
        raise BadPosition(f"not a stream position: {text[:80]!r}")
    return text


# The events after a position, and whether the reader may still see them: an active user, a
# member of the tenant, looked at in the same statement as the events it lets through. {scope} is
# one session's or the tenant's events; {after} is empty for a reader that has seen nothing yet.
_READ = """
WITH here AS (
    SELECT pg_current_snapshot() AS now,
           EXISTS (SELECT FROM tenants_membership m JOIN {users} u ON u.id = m.user_id
                   WHERE m.user_id = %(user)s AND m.tenant_id = %(tenant)s AND u.is_active) AS allowed
)
SELECT here.allowed, here.now::text, CASE WHEN here.allowed THEN (
    SELECT coalesce(json_agg(e ORDER BY e.id), '[]'::json) FROM (
        SELECT f.id, f.kind, f.session_id, f.task_id, f.data, f.created_at
        FROM agent_sessions_feedevent f
        WHERE {scope} {after}
          AND pg_visible_in_snapshot(f.txid::text::xid8, coalesce(%(batch)s::pg_snapshot, here.now))
          AND f.id > %(last)s
        ORDER BY f.id LIMIT %(limit)s
    ) e
) END
FROM here
"""
_AFTER = """
          AND f.txid >= pg_snapshot_xmin(%(seen)s::pg_snapshot)::text::bigint
          AND NOT pg_visible_in_snapshot(f.txid::text::xid8, %(seen)s::pg_snapshot)"""
_SCOPES = {"session": "f.session_id = %(session)s AND f.tenant_id = %(tenant)s", "tenant": "f.tenant_id = %(tenant)s"}
NOW = "SELECT pg_current_snapshot()::text"


@functools.cache
def _read_sql(scope: str, seen: bool) -> str:
    users = get_user_model()._meta.db_table
    return _READ.format(users=users, scope=_SCOPES[scope], after=_AFTER if seen else "")


def query(*, tenant: int, user: int, session, position: Position, limit: int) -> tuple[str, dict]:
    """The statement and parameters that read what follows `position` (session None: the
    tenant's every session)."""
    sql = _read_sql("session" if session is not None else "tenant", position.seen is not None)
    params = {
        "tenant": tenant,
        "user": user,
        "session": session,
        "seen": position.seen,
        "batch": position.batch,
        "last": position.last,
        "limit": limit,
    }
    return sql, params


Placed = list[tuple[dict, Position]]


def advance(position: Position, row: tuple, limit: int) -> tuple[bool, Placed, Position]:
    """What `query`'s row says: whether the reader may still read, each event read after
    `position` (with the reader's snapshot) with its own position, and where the reader is once
    it delivered them all."""
    allowed, now, events = row
    if not allowed:
        return False, [], position
    events = events or []
    batch = position.batch or now
    if len(events) < limit:  # the batch is complete
        done = Position(seen=batch)
        placed = [(event, Position(position.seen, batch, event["id"])) for event in events[:-1]]
        return True, ([*placed, (events[-1], done)] if events else []), done
    placed = [(event, Position(position.seen, batch, event["id"])) for event in events]
    return True, placed, placed[-1][1]


def read(*, tenant: int, user: int, session=None, position: Position, limit: int = 500):
    """`query` and `advance` on Django's connection: (allowed, [(event, position)], next position)."""
    sql, params = query(tenant=tenant, user=user, session=session, position=position, limit=limit)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return advance(position, cursor.fetchone(), limit)


@contextmanager
def consistent_read():
    """A transaction that reads one snapshot of the database, and the position of that snapshot:
    a page renders the state as of the position, and its stream continues from it (?after=)
    with nothing missed and nothing shown twice."""
    with transaction.atomic(), connection.cursor() as cursor:
        if not connection.savepoint_ids:  # the outermost transaction (tests nest in theirs)
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cursor.execute(NOW)
        yield Position(seen=cursor.fetchone()[0])
