"""The live event streams, as Server-Sent Events: `GET /api/v1/sessions/{id}/stream/` (one
session) and `GET /api/v1/stream/` (every session of a tenant).

They run in an ASGI process of their own (orchestrator_project/asgi.py), so that a thousand open
streams hold no thread of the API's. Each stream replays from the database what follows the
client's position (Last-Event-ID, or ?after= for a page that rendered a snapshot; none: the
whole session, or from now for a tenant), then waits for the bell: one Redis subscription per
process rings the readers of a tenant when a change is announced, and they read the database
again. Reading positions are snapshots (sessions/feed.py), so out-of-order commits neither skip
nor repeat an event. The membership is checked at connect, and again by every read, in the
statement that reads the events: a member removed mid-stream gets no further event. Every
payload passes through the redaction function.

Database reads go through a small pool of async connections of this process's own; Django's
connection is used only at connect (authentication) and closed at once.
"""

import asyncio
import contextvars
import json
import logging
import sys
import time
import uuid
from collections import OrderedDict
from urllib.parse import urlsplit

import psycopg
import redis.asyncio as aioredis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpResponseRedirect, JsonResponse, StreamingHttpResponse
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from rest_framework.exceptions import AuthenticationFailed

from api.throttling import FailedAuthenticationThrottle, carries_credentials, throttled_response
from orchestrator_project.redaction import redact_data
from sessions import feed
from sessions.models import Session
from tenants.models import Membership
from tokens.authentication import ApiTokenAuthentication

logger = logging.getLogger(__name__)


def server_argv(bind: str) -> list[str]:
    """The stream process's command, as the Procfile's `stream` runs it (for tests and benchmarks)."""
    return [
        sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "orchestrator_project.asgi:application",
        "--worker-class", "uvicorn_worker.UvicornWorker", "--workers", "1", "--graceful-timeout", "5",
        "--no-control-socket", "--bind", bind,
    ]  # fmt: skip


# How long a browser waits before it reconnects (the SSE `retry:` field), in milliseconds.
RECONNECT_MS = 2000


def _error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message, "details": {}}}, status=status)


# --- the bell: one Redis subscription per process ----------------------------------------------


class Reader:
    """One open stream: rung when a change of its tenant (and session, if it follows one) is announced."""

    def __init__(self, tenant: int, session: str | None):
        self.tenant, self.session = tenant, session
        self.rung = asyncio.Event()

    def ring(self, session: str) -> None:
        if self.session is None or self.session == session:
            self.rung.set()

    async def wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.rung.wait(), timeout)
        except TimeoutError:
            return False
        self.rung.clear()
        return True


class Bell:
    """The process's subscription to every tenant's channel (sessions/feed.py announce); started
    with the first reader, resubscribed after Redis comes back. While it is down, readers fall
    back on their poll (STREAM_POLL_SECONDS)."""

    def __init__(self):
        self.readers: dict[int, set[Reader]] = {}
        self._task: asyncio.Task | None = None

    def add(self, reader: Reader) -> None:
        self.readers.setdefault(reader.tenant, set()).add(reader)
        if self._task is None or self._task.done():
            # A context of its own: not the first request's (its trace, its log context) for good.
            self._task = asyncio.get_running_loop().create_task(self._listen(), context=contextvars.Context())

    def remove(self, reader: Reader) -> None:
        readers = self.readers.get(reader.tenant, set())
        readers.discard(reader)
        if not readers:
            self.readers.pop(reader.tenant, None)

    async def _listen(self) -> None:
        while True:
            client = aioredis.Redis.from_url(settings.REDIS_URL, health_check_interval=30, socket_keepalive=True)
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.psubscribe(f"{feed.CHANNEL_PREFIX}*")
                    # Whatever was announced while not subscribed: every reader looks again.
                    self._ring_all()
                    async for message in pubsub.listen():
                        self._ring(message["channel"], message["data"])
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("event stream: the Redis subscription failed; again in 1 s", exc_info=True)
                await asyncio.sleep(1.0)
            finally:
                await client.aclose()

    def _ring(self, channel: bytes, data: bytes) -> None:
        try:
            tenant = int(channel.decode().removeprefix(feed.CHANNEL_PREFIX))
        except ValueError:
            return
        session = data.decode(errors="replace")
        for reader in self.readers.get(tenant, ()):
            reader.ring(session)

    def _ring_all(self) -> None:
        for readers in self.readers.values():
            for reader in readers:
                reader.rung.set()


BELL = Bell()
_pool: AsyncConnectionPool | None = None
_connects: asyncio.Semaphore | None = None


def _connecting() -> asyncio.Semaphore:
    """At most STREAM_DB_POOL_SIZE connects at once: each opens a Django connection of its own
    (in a thread of its own) for a moment, and a burst of clients must not exhaust the database."""
    global _connects
    if _connects is None:
        _connects = asyncio.Semaphore(settings.STREAM_DB_POOL_SIZE)
    return _connects


async def pool() -> AsyncConnectionPool:
    """The process's pool of autocommit connections for reading the feed, opened on first use."""
    global _pool
    if _pool is None:
        db = settings.DATABASES["default"]
        conninfo = psycopg.conninfo.make_conninfo(
            dbname=db["NAME"], user=db["USER"], password=db["PASSWORD"] or None, host=db["HOST"] or None,
            port=str(db["PORT"]) if db["PORT"] else None, application_name="orchestrator-stream",
        )  # fmt: skip
        _pool = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=settings.STREAM_DB_POOL_SIZE,
            kwargs={"autocommit": True, "row_factory": tuple_row},
            check=AsyncConnectionPool.check_connection,
            open=False,
        )
        await _pool.open()
    return _pool


async def read(*, tenant: int, user: int, session: str | None, position: feed.Position):
    sql, params = feed.query(tenant=tenant, user=user, session=session, position=position, limit=settings.STREAM_BATCH)
    async with (await pool()).connection() as conn:
        cursor = await conn.execute(sql, params)
        return feed.advance(position, await cursor.fetchone(), settings.STREAM_BATCH)


async def now_position() -> feed.Position:
    async with (await pool()).connection() as conn:
        cursor = await conn.execute(feed.NOW)
        return feed.Position(seen=(await cursor.fetchone())[0])


# --- the stream ---------------------------------------------------------------------------------


# The rendered data of recent events, by feed id: each event is redacted once per process, not
# once per reader (a busy tenant's event goes to every open page of it).
_rendered: OrderedDict[int, str] = OrderedDict()
RENDERED_KEPT = 4096


def _data(event: dict) -> str:
    if (cached := _rendered.get(event["id"])) is not None:
        _rendered.move_to_end(event["id"])
        return cached
    fields = redact_data(event["data"])
    if isinstance(fields.get("error"), str):
        fields["error"] = fields["error"][: feed.ERROR_SHOWN]
    data = {
        "id": event["id"],
        "kind": event["kind"],
        "session": event["session_id"],
        "task": event["task_id"],
        "at": event["created_at"],
        **fields,
    }
    _rendered[event["id"]] = rendered = json.dumps(data)
    if len(_rendered) > RENDERED_KEPT:
        _rendered.popitem(last=False)
    return rendered


def message(event: dict, position: feed.Position) -> str:
    """One SSE message: its id is the event's position; its data the redacted event."""
    return f"id: {position.encode()}\nevent: {event['kind']}\ndata: {_data(event)}\n\n"


async def events(*, tenant: int, user: int, session: str | None, position: feed.Position | None):
    """The stream: a `start` message with the starting position (a client that drops before any
    event resumes from it), then the events, heartbeats, and `end` when the reader may no longer
    see the tenant. It closes after STREAM_MAX_SECONDS: the browser reconnects where it was and
    is authenticated again. While the database is away it waits and reads again."""
    reader = Reader(tenant, session)
    BELL.add(reader)  # before the first read: nothing announced after it is missed
    try:
        if position is None:  # a session's stream replays it whole; a tenant's starts now
            position = feed.Position(seen=None) if session is not None else await now_position()
        yield f"retry: {RECONNECT_MS}\nid: {position.encode()}\nevent: start\ndata: {{}}\n\n"
        started = time.monotonic()
        next_beat = started + settings.STREAM_HEARTBEAT_SECONDS
        backoff = 0.0
        while time.monotonic() - started < settings.STREAM_MAX_SECONDS:
            try:
                allowed, placed, position = await read(tenant=tenant, user=user, session=session, position=position)
                backoff = 0.0
            except (psycopg.Error, PoolTimeout):
                logger.warning("event stream: reading the feed failed; again soon", exc_info=True)
                allowed, placed, backoff = True, [], min(5.0, backoff * 2 or 0.5)
                yield ": the database is unavailable; retrying\n\n"
                await asyncio.sleep(backoff)
            if not allowed:
                yield 'event: end\ndata: {"reason": "no longer a member of this tenant"}\n\n'
                return
            for event, at in placed:
                yield message(event, at)
            if len(placed) == settings.STREAM_BATCH:
                continue  # more of the batch
            # Until rung, the next poll or the next heartbeat, whichever comes first.
            await reader.wait(min(settings.STREAM_POLL_SECONDS, max(0.0, next_beat - time.monotonic())))
            if time.monotonic() >= next_beat:
                yield ": heartbeat\n\n"
                next_beat = time.monotonic() + settings.STREAM_HEARTBEAT_SECONDS
    finally:
        BELL.remove(reader)


# --- the views ----------------------------------------------------------------------------------


def _authenticate(request):
    """The API's authentication: a token (Authorization: Token ...), or the console's login."""
    try:
        found = ApiTokenAuthentication().authenticate(request)
    except AuthenticationFailed as exc:
        return None, str(exc.detail)
    if found is not None:
        return found[0], None
    return (request.user, None) if request.user.is_authenticated else (None, None)


def _session_tenant(user, session_id) -> int | None:
    sessions = Session.objects.filter(pk=session_id, tenant__memberships__user=user)
    return sessions.values_list("tenant_id", flat=True).first()


def _tenant_of(user, slug: str | None) -> int | JsonResponse:
    memberships = Membership.objects.filter(user=user)
    if slug:
        memberships = memberships.filter(tenant__slug=slug)
    tenants = list(memberships.values_list("tenant_id", flat=True)[:2])
    if not tenants:
        return _error(404, "not_found", "No such tenant of yours.")
    if len(tenants) > 1:
        return _error(400, "invalid", "tenant: you belong to several tenants; name one with ?tenant=")
    return tenants[0]


def _connect(request, session_id):
    """Who asks and for what, at connect: (user, tenant, error response). A token from an address
    over its budget of failed authentications is refused before it is looked at, and a bad one
    counts against it, as in the API's process (api/throttling.py)."""
    failures = FailedAuthenticationThrottle() if carries_credentials(request) else None
    try:
        if failures and (wait := failures.wait_before_trying(request)) is not None:
            return None, None, throttled_response(wait)
        user, problem = _authenticate(request)
        if user is None:
            if failures:
                failures.record_failure(request)
            problem = problem or "Authentication credentials were not provided."
            return None, None, _error(401, "not_authenticated", problem)
        if session_id is not None:
            tenant = _session_tenant(user, session_id)
            if tenant is None:
                return None, None, _error(404, "not_found", "No session found.")
            return user, tenant, None
        tenant = _tenant_of(user, request.GET.get("tenant"))
        if isinstance(tenant, JsonResponse):
            return None, None, tenant
        return user, tenant, None
    except DatabaseError:
        logger.warning("event stream: the database is unavailable at connect", exc_info=True)
        refused = _error(503, "unavailable", "The database is unavailable; try again.")
        refused["Retry-After"] = "5"
        return None, None, refused
    finally:
        connection.close()  # the stream reads through its own pool; hold nothing of Django's


def _position(request) -> feed.Position | JsonResponse | None:
    text = request.headers.get("Last-Event-ID") or request.GET.get("after")
    if not text:
        return None
    try:
        return feed.Position.parse(text)
    except feed.BadPosition as exc:
        return _error(400, "invalid", f"Last-Event-ID/after: {exc}")


def _foreign_origin(request) -> bool:
    """A browser page of another origin than this process's and not in STREAM_ALLOWED_ORIGINS."""
    origin = request.headers.get("Origin")
    if not origin or origin in settings.STREAM_ALLOWED_ORIGINS:
        return False
    return urlsplit(origin).netloc != request.get_host()


def _cors(request, response):
    response["Vary"] = "Origin"
    origin = request.headers.get("Origin")
    if origin and origin in settings.STREAM_ALLOWED_ORIGINS:
        response["Access-Control-Allow-Origin"] = origin
        response["Access-Control-Allow-Credentials"] = "true"
    return response


class _Open:
    """The streams each user has open in this process (at most STREAM_MAX_PER_USER)."""

    def __init__(self):
        self.count: dict[int, int] = {}

    def take(self, user: int) -> bool:
        if self.count.get(user, 0) >= settings.STREAM_MAX_PER_USER:
            return False
        self.count[user] = self.count.get(user, 0) + 1
        return True

    def give_back(self, user: int) -> None:
        self.count[user] -= 1
        if not self.count[user]:
            del self.count[user]


OPEN = _Open()


async def _counted(user: int, stream):
    try:
        async for part in stream:
            yield part
    finally:
        OPEN.give_back(user)


async def _stream(request, session_id: str | None):
    if request.method != "GET":
        return _cors(request, _error(405, "method_not_allowed", f'Method "{request.method}" not allowed.'))
    if _foreign_origin(request):
        return _cors(request, _error(403, "forbidden", "This origin may not read the event streams."))
    async with _connecting():
        user, tenant, refused = await sync_to_async(_connect)(request, session_id)
    if refused is not None:
        return _cors(request, refused)
    position = _position(request)
    if isinstance(position, JsonResponse):
        return _cors(request, position)
    if not OPEN.take(user.pk):
        refused = _error(429, "throttled", f"At most {settings.STREAM_MAX_PER_USER} open streams per user.")
        refused["Retry-After"] = str(RECONNECT_MS // 1000)
        return _cors(request, refused)
    stream = events(tenant=tenant, user=user.pk, session=session_id, position=position)
    response = StreamingHttpResponse(_counted(user.pk, stream), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return _cors(request, response)


async def session_stream(request, pk):
    try:
        session_id = str(uuid.UUID(str(pk)))
    except ValueError:
        return _cors(request, _error(404, "not_found", "No session found."))
    return await _stream(request, session_id)


async def tenant_stream(request):
    return await _stream(request, None)


def elsewhere(request, pk=None):
    """In the API's own process: the streams are served by the stream process (STREAM_URL)."""
    if base := feed.stream_base(request):
        query = f"?{request.META['QUERY_STRING']}" if request.META.get("QUERY_STRING") else ""
        return HttpResponseRedirect(f"{base}{request.path}{query}", status=307)
    return _error(404, "not_found", "The event streams are served by the stream process (docs/CONSOLE.md).")
