"""The feed and the live event streams (sessions/feed.py, api/stream.py): what the triggers write,
positions that survive out-of-order commits, and the streams served by a real ASGI process:
resume by Last-Event-ID, the membership checked by every read, heartbeats, redaction, bad input."""

import json
import threading
import time
from contextlib import closing, contextmanager

import httpx
import psycopg
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model

from sessions import feed
from sessions.models import FeedEvent, Session
from tasks.models import Task
from tenants.models import Membership

from .conftest import Stack, dag_payload, error_of, member_client, member_token, wait_until, worker_database_url

NOTHING = feed.Position(seen=None)


def new_session(client, **overrides) -> Session:
    created = client.post("/api/v1/sessions/", dag_payload(**overrides), format="json")
    assert created.status_code == 201, created.content
    return Session.objects.get(pk=created.json()["id"])


def read_all(position: feed.Position, *, session=None, limit: int = 500, user=None, tenant=None):
    """Every event after `position`, in the order a stream delivers them, and the final position."""
    delivered = []
    while True:
        allowed, placed, position = feed.read(tenant=tenant, user=user, session=session, position=position, limit=limit)
        assert allowed
        delivered += placed
        if len(placed) < limit:
            return delivered, position


@pytest.fixture
def alice(transactional_db):
    """A member's client. The feed's tests commit: a reader sees what has committed, and a test's
    own open transaction has not (the `db` fixture's would hide everything)."""
    return member_client("acme", "alice")


def alice_and_session(client) -> tuple[int, Session]:
    session = new_session(client)
    user = Membership.objects.get(tenant=session.tenant, user__username="alice").user_id
    return user, session


# --- what the triggers write ------------------------------------------------------------------


def test_a_session_its_transitions_and_its_tasks_status_changes_are_in_the_feed(alice):
    user, session = alice_and_session(alice)
    session.transition(Session.Status.QUEUED, reason="start", actor="user:alice")
    design = session.tasks.get(key="design")
    Task.objects.filter(pk=design.pk).update(status=Task.Status.RUNNING, attempts=1)
    Task.objects.filter(pk=design.pk).update(upstream_open=0)  # no change of status: no event
    Task.objects.filter(pk=design.pk).update(status=Task.Status.FAILED, error="boom")

    placed, _ = read_all(NOTHING, session=session.pk, user=user, tenant=session.tenant_id)

    seen = [(e["kind"], e["data"].get("key"), e["data"]["from"], e["data"]["to"]) for e, _ in placed]
    assert seen == [
        ("session", None, None, "pending"),
        ("session", None, "pending", "queued"),
        ("task", "design", "pending", "running"),
        ("task", "design", "running", "failed"),
    ]
    assert placed[3][0]["data"]["error"] == "boom" and placed[3][0]["task_id"] == str(design.pk)
    assert placed[1][0]["data"]["actor"] == "user:alice" and placed[1][0]["data"]["reason"] == "start"


def test_a_deleted_session_takes_its_feed_with_it(alice):
    _, session = alice_and_session(alice)
    session.delete()
    assert not FeedEvent.objects.filter(session_id=session.pk).exists()


# --- positions --------------------------------------------------------------------------------


@contextmanager
def raw_transaction():
    """A connection of its own to the test database, in a transaction the test commits when it says."""
    with closing(psycopg.connect(worker_database_url())) as conn:
        yield conn


def test_out_of_order_commits_are_neither_skipped_nor_repeated(transactional_db):
    client = member_client("acme", "alice")
    user, session = alice_and_session(client)
    before, position = read_all(NOTHING, session=session.pk, user=user, tenant=session.tenant_id)
    first, second = session.tasks.get(key="api"), session.tasks.get(key="ui")

    with raw_transaction() as early, raw_transaction() as late:
        # `early` takes the lower id and stays open; `late` takes the next id and commits first.
        early.execute("UPDATE tasks_task SET status = 'queued' WHERE id = %s", [first.pk])
        late.execute("UPDATE tasks_task SET status = 'queued' WHERE id = %s", [second.pk])
        late.commit()
        after_late, position = read_all(position, session=session.pk, user=user, tenant=session.tenant_id)
        early.commit()
    after_early, position = read_all(position, session=session.pk, user=user, tenant=session.tenant_id)
    again, _ = read_all(position, session=session.pk, user=user, tenant=session.tenant_id)

    [late_event] = [e for e, _ in after_late]
    [early_event] = [e for e, _ in after_early]
    assert late_event["task_id"] == str(second.pk) and early_event["task_id"] == str(first.pk)
    # The trap: the event committed last has the lower id, so `id > last delivered` would skip it.
    assert early_event["id"] < late_event["id"]
    assert again == []
    delivered = [e["id"] for e, _ in before + after_late + after_early]
    assert sorted(delivered) == list(FeedEvent.objects.filter(session=session).values_list("id", flat=True))


def test_a_long_batch_resumes_after_exactly_the_event_seen(alice):
    user, session = alice_and_session(alice)
    for key in ("design", "api", "ui", "tests"):
        session.tasks.filter(key=key).update(status=Task.Status.QUEUED)
    everything, _ = read_all(NOTHING, session=session.pk, user=user, tenant=session.tenant_id, limit=2)
    ids = [e["id"] for e, _ in everything]
    assert len(ids) == 5 and ids == sorted(ids)

    for index, (_, position) in enumerate(everything):
        # A client that saw this event last, reconnecting with its id as Last-Event-ID.
        resumed = feed.Position.parse(position.encode())
        rest, _ = read_all(resumed, session=session.pk, user=user, tenant=session.tenant_id, limit=2)
        assert [e["id"] for e, _ in rest] == ids[index + 1 :]


def test_a_reader_no_longer_a_member_reads_nothing(alice):
    user, session = alice_and_session(alice)
    Membership.objects.filter(user_id=user).delete()

    allowed, placed, position = feed.read(tenant=session.tenant_id, user=user, session=session.pk, position=NOTHING)

    assert (allowed, placed, position) == (False, [], NOTHING)


def test_a_tenants_feed_has_only_its_own_sessions(alice):
    user, mine = alice_and_session(alice)
    theirs = new_session(member_client("other", "bob"))

    placed, _ = read_all(NOTHING, user=user, tenant=mine.tenant_id)

    assert {e["session_id"] for e, _ in placed} == {str(mine.pk)} and theirs.tenant_id != mine.tenant_id


@pytest.mark.parametrize(
    "text",
    [
        "garbage",
        "1:2",
        "1:2:3~",
        "a:b:c",
        "1:2:~1:3:~x",
        "1:2:~1:3:",
        "~~",
        "1:2:3,~4:5:~1",
        "9" * 17000,
        "\u0661:\u0662:",
        "5:3:",
        "1:2:7",
        "3:9:5,4",
        "3:9:4,4",
        "0:0:",
        "18446744073709551616:18446744073709551617:",
        "1:2:~1:3:~\u00b2",
        "1:2:~1:3:~-1",
    ],
)
def test_a_position_that_is_not_ours_is_refused(text):
    with pytest.raises(feed.BadPosition):
        feed.Position.parse(text)


def test_positions_survive_the_round_trip():
    for position in [feed.Position("10:12:10,11"), feed.Position(None, "5:5:", 7), feed.Position("1:3:2", "4:4:", 9),
                     feed.Position("7:90:7,8,9,33,89")]:  # fmt: skip
        assert feed.Position.parse(position.encode()) == position


# --- the stream process -------------------------------------------------------------------------


class Events:
    """A Server-Sent Events client: each message as a dict of its fields; comments as {"comment": ...}."""

    def __init__(self, url: str, headers: dict | None = None):
        self._stream = httpx.stream("GET", url, headers=headers or {}, timeout=httpx.Timeout(10.0))
        self.response = self._stream.__enter__()
        self._lines = self.response.iter_lines()
        if self.response.status_code == 200:
            # The first message sets the reconnection delay and says where the stream starts.
            self.start = self.next()
            assert (self.start["retry"], self.start["event"], self.start["data"]) == ("2000", "start", "{}")

    def next(self) -> dict:
        message: dict = {}
        for line in self._lines:
            if not line:
                if message:
                    return message
                continue
            if line.startswith(":"):
                return {"comment": line[1:].strip()}
            name, _, value = line.partition(":")
            message[name] = value.removeprefix(" ")
        raise EOFError("the stream ended")

    def until(self, done, what: str, timeout: float = 20.0) -> list[dict]:
        """Messages with data (not comments) until done(messages);
        fails after `timeout`."""
        messages: list[dict] = []
        deadline = time.monotonic() + timeout
        while not done(messages):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {messages}")
            message = self.next()
            if "comment" not in message:
                messages.append(message)
        return messages

    def close(self) -> None:
        self._stream.__exit__(None, None, None)


def ids_of(messages: list[dict]) -> list[int]:
    return [json.loads(m["data"])["id"] for m in messages if m.get("event") in ("session", "task")]


@pytest.fixture(scope="module")
def stream_process():
    """One stream process for the module's tests (it holds nothing between them but its pool)."""
    stack = Stack(env={"STREAM_HEARTBEAT_SECONDS": "0.5"})
    try:
        yield stack.stream()
    finally:
        stack.stop()


@pytest.fixture
def stream_url(stream_process, transactional_db):
    return stream_process


def test_the_stream_replays_then_follows_live_and_resumes_after_the_last_event_seen(stream_url):
    token = member_token("acme", "alice")
    client = member_client("acme", "alice")
    _, session = alice_and_session(client)
    headers = {"Authorization": f"Token {token}"}
    url = f"{stream_url}/api/v1/sessions/{session.pk}/stream/"

    events = Events(url, headers)
    assert events.response.status_code == 200
    assert events.response.headers["content-type"].startswith("text/event-stream")
    replayed = events.until(lambda got: len(got) >= 1, "the replay")
    session.transition(Session.Status.QUEUED, reason="start", actor="user:alice")  # announced on commit
    live = events.until(lambda got: len(got) >= 1, "the live event")
    events.close()
    # While nobody watches: three more changes.
    for key in ("design", "api", "ui"):
        session.tasks.filter(key=key).update(status=Task.Status.QUEUED)
    feed.announce(session.tenant_id, session.pk)

    resumed = Events(url, {**headers, "Last-Event-ID": live[-1]["id"]})
    rest = resumed.until(lambda got: len(got) >= 3, "the events missed")
    resumed.close()

    delivered = ids_of(replayed + live + rest)
    assert delivered == list(FeedEvent.objects.filter(session=session).values_list("id", flat=True))
    assert [json.loads(m["data"])["to"] for m in replayed + live] == ["pending", "queued"]


def test_the_stream_delivers_out_of_order_commits_once_each(stream_url):
    client = member_client("acme", "alice")
    token = member_token("acme", "alice")
    _, session = alice_and_session(client)
    events = Events(f"{stream_url}/api/v1/sessions/{session.pk}/stream/", {"Authorization": f"Token {token}"})
    events.until(lambda got: len(got) >= 1, "the replay")
    first, second = session.tasks.get(key="api"), session.tasks.get(key="ui")

    with raw_transaction() as early, raw_transaction() as late:
        early.execute("UPDATE tasks_task SET status = 'queued' WHERE id = %s", [first.pk])
        late.execute("UPDATE tasks_task SET status = 'queued' WHERE id = %s", [second.pk])
        late.commit()
        feed.announce(session.tenant_id, session.pk)
        got_late = events.until(lambda got: len(got) >= 1, "the event committed first")
        early.commit()
    feed.announce(session.tenant_id, session.pk)
    got_early = events.until(lambda got: len(got) >= 1, "the event committed last")
    events.close()

    assert [json.loads(m["data"])["task"] for m in got_late + got_early] == [str(second.pk), str(first.pk)]
    assert ids_of(got_late)[0] > ids_of(got_early)[0]


def test_a_member_removed_mid_stream_gets_no_further_event(stream_url):
    token = member_token("acme", "carol", role=Membership.Role.VIEWER)
    client = member_client("acme", "alice")
    _, session = alice_and_session(client)
    events = Events(f"{stream_url}/api/v1/stream/", {"Authorization": f"Token {token}"})
    session.transition(Session.Status.QUEUED, reason="start", actor="user:alice")
    assert ids_of(events.until(lambda got: len(got) >= 1, "the start"))  # a viewer may watch

    Membership.objects.filter(user__username="carol").delete()
    session.tasks.filter(key="design").update(status=Task.Status.RUNNING)
    feed.announce(session.tenant_id, session.pk)
    [last] = events.until(lambda got: len(got) >= 1, "the end")
    events.close()

    assert last["event"] == "end" and "member" in last["data"]


def test_heartbeats_keep_an_idle_stream_open(stream_url):
    token = member_token("acme", "alice")
    events = Events(f"{stream_url}/api/v1/stream/", {"Authorization": f"Token {token}"})
    beats = [events.next() for _ in range(3)]
    events.close()
    # Comments, nothing else: no session changed.
    assert beats == [{"comment": "heartbeat"}] * 3


def test_secrets_in_a_tasks_error_never_reach_the_stream(stream_url):
    token = member_token("acme", "alice")
    _, session = alice_and_session(member_client("acme", "alice"))
    planted = f"export DATABASE_PASSWORD=hunter2-planted; key {settings.SECRET_KEY} db {worker_database_url()}"
    session.tasks.filter(key="design").update(status=Task.Status.FAILED, error=planted)

    events = Events(f"{stream_url}/api/v1/sessions/{session.pk}/stream/", {"Authorization": f"Token {token}"})
    [_, failed] = events.until(lambda got: len(got) >= 2, "the failure")
    events.close()

    assert "hunter2-planted" not in failed["data"] and settings.SECRET_KEY not in failed["data"]
    assert "[redacted]" in json.loads(failed["data"])["error"]


def test_a_credential_across_the_shown_length_is_redacted_before_the_cut(stream_url):
    token = member_token("acme", "alice")
    _, session = alice_and_session(member_client("acme", "alice"))
    error = "x" * (feed.ERROR_SHOWN - 20) + " postgres://app:a-long-database-password@db:5432/orch"
    session.tasks.filter(key="design").update(status=Task.Status.FAILED, error=error)

    events = Events(f"{stream_url}/api/v1/sessions/{session.pk}/stream/", {"Authorization": f"Token {token}"})
    [_, failed] = events.until(lambda got: len(got) >= 2, "the failure")
    events.close()

    shown = json.loads(failed["data"])["error"]
    assert len(shown) == feed.ERROR_SHOWN and "a-long" not in shown and "postgres://app:[red" in shown


def test_a_deactivated_user_gets_no_further_event(stream_url):
    token = member_token("acme", "dave")
    _, session = alice_and_session(member_client("acme", "alice"))
    events = Events(f"{stream_url}/api/v1/sessions/{session.pk}/stream/", {"Authorization": f"Token {token}"})
    events.until(lambda got: len(got) >= 1, "the replay")

    get_user_model().objects.filter(username="dave").update(is_active=False)
    session.transition(Session.Status.QUEUED, reason="start", actor="user:alice")
    [last] = events.until(lambda got: len(got) >= 1, "the end")
    events.close()

    assert last["event"] == "end"


def test_one_user_may_hold_only_so_many_streams(stream_url):
    token = member_token("acme", "alice")
    url = f"{stream_url}/api/v1/stream/?tenant=acme"
    held = [Events(url, {"Authorization": f"Token {token}"}) for _ in range(settings.STREAM_MAX_PER_USER)]
    try:
        refused = httpx.get(url, headers={"Authorization": f"Token {token}"})
        assert error_of(refused, 429)["code"] == "throttled" and refused.headers["Retry-After"]
    finally:
        for events in held:
            events.close()
    # Closed streams are given back.
    wait_until(
        lambda: Events(url, {"Authorization": f"Token {token}"}).response.status_code == 200, what="a stream again"
    )


def test_the_stream_refuses_what_it_cannot_serve(stream_url):
    token = member_token("acme", "alice")
    other = member_token("other", "bob")
    _, session = alice_and_session(member_client("acme", "alice"))
    member_token("third", "alice")  # alice now belongs to two tenants
    auth = {"Authorization": f"Token {token}"}
    url = f"{stream_url}/api/v1/sessions/{session.pk}/stream/"

    assert error_of(httpx.get(url), 401)["code"] == "not_authenticated"
    assert error_of(httpx.get(url, headers={"Authorization": "Token nope"}), 401)["code"] == "not_authenticated"
    assert error_of(httpx.get(url, headers={"Authorization": f"Token {other}"}), 404)["code"] == "not_found"
    missing = f"{stream_url}/api/v1/sessions/not-a-uuid/stream/"
    assert error_of(httpx.get(missing, headers=auth), 404)["code"] == "not_found"
    bad = {**auth, "Last-Event-ID": "1:2:3~oops"}
    assert "Last-Event-ID" in error_of(httpx.get(url, headers=bad), 400)["message"]
    assert "after" in error_of(httpx.get(f"{url}?after=%00", headers=auth), 400)["message"]
    assert "several tenants" in error_of(httpx.get(f"{stream_url}/api/v1/stream/", headers=auth), 400)["message"]
    not_mine = httpx.get(f"{stream_url}/api/v1/stream/?tenant=other", headers=auth)
    assert error_of(not_mine, 404)["code"] == "not_found"
    foreign = httpx.get(url, headers={**auth, "Origin": "https://evil.example"})
    assert error_of(foreign, 403)["code"] == "forbidden" and foreign.headers["Vary"] == "Origin"
    assert error_of(httpx.post(url, headers=auth), 405)["code"] == "method_not_allowed"


def test_the_api_process_points_to_the_stream_process(api, settings):
    settings.STREAM_URL = "http://streams.example:8001"
    moved = api.get("/api/v1/stream/?tenant=acme")
    assert moved.status_code == 307 and moved["Location"] == "http://streams.example:8001/api/v1/stream/?tenant=acme"
    settings.STREAM_URL = ":8001"  # make up's: the host the client asked, on the streams' port
    moved = api.get("/api/v1/sessions/x/stream/", HTTP_HOST="localhost:8000")
    assert moved.status_code == 307 and moved["Location"] == "http://localhost:8001/api/v1/sessions/x/stream/"
    settings.STREAM_URL = ""
    assert "stream process" in error_of(api.get("/api/v1/stream/"), 404)["message"]


def test_many_readers_each_get_every_event_once(stream_url):
    token = member_token("acme", "alice")
    _, session = alice_and_session(member_client("acme", "alice"))
    url = f"{stream_url}/api/v1/sessions/{session.pk}/stream/"
    results: dict[int, list[int]] = {}

    def watch(index: int) -> None:
        events = Events(url, {"Authorization": f"Token {token}"})
        results[index] = ids_of(events.until(lambda got: len(got) >= 4, "four events"))
        events.close()

    watchers = [threading.Thread(target=watch, args=(i,)) for i in range(10)]
    for watcher in watchers:
        watcher.start()
    for key in ("design", "api", "ui"):
        session.tasks.filter(key=key).update(status=Task.Status.QUEUED)
        feed.announce(session.tenant_id, session.pk)
    for watcher in watchers:
        watcher.join(timeout=30)

    expected = list(FeedEvent.objects.filter(session=session).values_list("id", flat=True))
    assert len(expected) == 4 and results == {i: expected for i in range(10)}
