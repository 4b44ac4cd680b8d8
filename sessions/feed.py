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

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction

from orchestrator_project.redis_client import redis_client

logger = logging.getLogger(__name__)

CHANNEL_PREFIX = "io:feed:"
# A pg_snapshot as text: xmin:xmax:xip,xip,...
_SNAPSHOT = re.compile(r"\d{1,20}:\d{1,20}:(\d{1,20}(,\d{1,20})*)?")
# The longest position a client may send: a snapshot lists the transactions in progress.
MAX_POSITION_LENGTH = 8192


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


def announce(tenant_id, session_id) -> None:
    """Wake the stream readers of the tenant (after a change has committed). Best effort."""
    try:
        redis_client().publish(channel(tenant_id), str(session_id))
    except Exception:
        logger.warning("could not announce a change of session %s", session_id, exc_info=True)


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
        if len(text) > MAX_POSITION_LENGTH:
            raise BadPosition("the position is too long")
        parts = text.split("~")
        if len(parts) == 1 and _SNAPSHOT.fullmatch(parts[0]):
            return cls(seen=parts[0])
        if (
            len(parts) == 3
            and (not parts[0] or _SNAPSHOT.fullmatch(parts[0]))
            and _SNAPSHOT.fullmatch(parts[1])
            and parts[2].isdigit()
            and len(parts[2]) <= 19
        ):
            return cls(seen=parts[0] or None, batch=parts[1], last=int(parts[2]))
        raise BadPosition(f"not a stream position: {text[:80]!r}")


# The events after a position, and whether the reader may still see them: the membership is
# looked at in the same statement as the events it lets through. {scope} is one session's or the
# tenant's events; {after} is empty for a reader that has seen nothing yet.
_READ = """
WITH here AS (
    SELECT pg_current_snapshot() AS now,
           EXISTS (SELECT FROM tenants_membership m WHERE m.user_id = %(user)s AND m.tenant_id = %(tenant)s) AS allowed
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
READ = {
    (scope, seen): _READ.format(scope=where, after=_AFTER if seen else "")
    for scope, where in _SCOPES.items()
    for seen in (True, False)
}
NOW = "SELECT pg_current_snapshot()::text"


def query(*, tenant: int, user: int, session, position: Position, limit: int) -> tuple[str, dict]:
    """The statement and parameters that read what follows `position` (session None: the
    tenant's every session)."""
    sql = READ[("session" if session is not None else "tenant", position.seen is not None)]
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


def advance(position: Position, now: str, events: list[dict], limit: int) -> tuple[Placed, Position]:
    """Each event read after `position` (with the reader's snapshot `now`) with its own
    position, and where the reader is once it delivered them all."""
    batch = position.batch or now
    if len(events) < limit:  # the batch is complete
        done = Position(seen=batch)
        placed = [(event, Position(position.seen, batch, event["id"])) for event in events[:-1]]
        return ([*placed, (events[-1], done)] if events else []), done
    placed = [(event, Position(position.seen, batch, event["id"])) for event in events]
    return placed, placed[-1][1]


def read(*, tenant: int, user: int, session=None, position: Position, limit: int = 500):
    """`query` and `advance` on Django's connection: (allowed, [(event, position)], next position)."""
    sql, params = query(tenant=tenant, user=user, session=session, position=position, limit=limit)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        allowed, now, events = cursor.fetchone()
    if not allowed:
        return False, [], position
    placed, after = advance(position, now, events or [], limit)
    return True, placed, after


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
