"""R5: 50 concurrent clients racing start/pause/resume/cancel/retry on one session, over real HTTP
(a live threaded server, PostgreSQL, Redis): every answer is a 2xx or a 409 in the one error shape,
the event log is a legal path through the state machine that ends in the row's status, and replaying the
log gives the row.

No Celery worker runs (dispatch messages just wait on the broker). Instead a "claimer" thread calls
the orchestrator's own queued -> running step (tasks.lifecycle.mark_session_running, the body of the
task an agent's first claim sends), so that running can be part of the race too (and with it,
rarely, stopped by a cancel while running, then retry)."""

import itertools
import random
import threading
import time
from collections import Counter
from io import StringIO

import httpx
import pytest
from django.core.management import call_command
from django.db import connections

from sessions.models import RETRYABLE, TRANSITIONS, Session, SessionEvent
from tasks.lifecycle import mark_session_running
from tests.conftest import dag_payload, error_of

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

S = Session.Status
CLIENTS = 50
ACTIONS_PER_CLIENT = 6
# Cancel is rare and never a client's first action: a cancel that wins the first race would end
# the session (cancelled is terminal) before anything else could race.
ACTIONS = ("start", "pause", "resume", "retry", "cancel")
WEIGHTS = (3, 4, 4, 3, 1)
HTTP_TIMEOUT = httpx.Timeout(20.0, connect=10.0)
BARRIER_TIMEOUT_S = 30


def tenant_token(tenant_slug: str, username: str) -> str:
    """The API token of a member of the tenant, made by the real command (as member_client does)."""
    out = StringIO()
    call_command("bootstrap_tenant", tenant_slug, user=username, rotate=True, stdout=out, stderr=StringIO())
    return out.getvalue().strip().splitlines()[-1]


def replay(events: list[SessionEvent]) -> tuple[str, int, int]:
    """Replay a session's event log (ordered by id) from "pending", checking each status change
    against sessions.models.TRANSITIONS from the replayed state. Notes (from == to)
    are passed over. Returns (status, number of status changes, number of retries)."""
    state, changes, retries = S.PENDING, 0, 0
    for event in events:
        assert event.from_status == state, f"event {event.pk} starts from {event.from_status}, replay is at {state}"
        if event.to_status == event.from_status:
            continue  # Session.note: no status change
        assert event.to_status in TRANSITIONS[state], f"event {event.pk}: {state} -> {event.to_status} is illegal"
        changes += 1
        retries += state in RETRYABLE and event.to_status == S.QUEUED
        state = event.to_status
    return state, changes, retries


def action_of(event: SessionEvent) -> str:
    """The endpoint that wrote a client's event, from the reason tasks.lifecycle gives it."""
    reasons = {"started": "start", "paused": "pause", "resumed": "resume"}
    if event.reason in reasons:
        return reasons[event.reason]
    return event.reason.split()[0].replace("stopped", "cancel").replace("cancelled", "cancel")


def test_fifty_clients_racing_transitions_leave_a_legal_replayable_event_log(live_server, transactional_db):
    headers = {"Authorization": f"Token {tenant_token('acme', 'racer')}"}
    with httpx.Client(base_url=live_server.url, headers=headers, timeout=HTTP_TIMEOUT) as setup:
        created = setup.post("/api/v1/sessions/", json=dag_payload(max_retries=10))
        assert created.status_code == 201, created.content
    session_id = created.json()["id"]
    base = f"/api/v1/sessions/{session_id}"

    barrier = threading.Barrier(CLIENTS + 1)  # the clients and the claimer
    racing = threading.Event()
    responses: list[tuple[str, httpx.Response]] = []
    failures: list[BaseException] = []
    claims: list[bool] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        rng = random.Random(n)
        plan = [rng.choice(ACTIONS[:3])]
        plan += rng.choices(ACTIONS, WEIGHTS, k=ACTIONS_PER_CLIENT - 1)
        answered = []
        try:
            with httpx.Client(base_url=live_server.url, headers=headers, timeout=HTTP_TIMEOUT) as http:
                # Open the connection before the barrier, so that the race is on the session, not
                # on the server's accept queue.
                assert http.get(f"{base}/").status_code == 200
                barrier.wait(timeout=BARRIER_TIMEOUT_S)
                for action in plan:
                    answered.append((action, http.post(f"{base}/{action}/")))
        except BaseException as exc:
            with lock:
                failures.append(exc)
        finally:
            with lock:
                responses.extend(answered)

    def claimer() -> None:
        """An agent's first claim, over and over: queued -> running while the session is queued."""
        claimed = []
        try:
            barrier.wait(timeout=BARRIER_TIMEOUT_S)
            while racing.is_set():
                claimed.append(mark_session_running(session_id, "design", "racer-agent"))
                time.sleep(0.01)
        except BaseException as exc:
            with lock:
                failures.append(exc)
        finally:
            connections.close_all()
            with lock:
                claims.extend(claimed)

    racing.set()
    clients = [threading.Thread(target=client, args=(n,), name=f"racer-{n}") for n in range(CLIENTS)]
    claiming = threading.Thread(target=claimer, name="claimer")
    began = time.monotonic()
    for thread in [*clients, claiming]:
        thread.start()
    for thread in clients:
        thread.join(timeout=60)
    racing.clear()
    claiming.join(timeout=30)
    elapsed = time.monotonic() - began
    assert not any(t.is_alive() for t in [*clients, claiming]), "a racer hung"
    assert not failures, failures

    # Every answer: accepted, or a conflict in the one error shape; never a 5xx.
    codes = Counter(response.status_code for _, response in responses)
    assert len(responses) == CLIENTS * ACTIONS_PER_CLIENT
    assert set(codes) <= {202, 409}, codes
    for _, response in responses:
        if response.status_code == 409:
            assert error_of(response, 409)["code"] in {"invalid_transition", "conflict"}
        else:
            assert response.json()["status"] in S.values

    row = Session.objects.get(pk=session_id)
    events = list(SessionEvent.objects.filter(session_id=session_id).order_by("id"))
    assert events, "no event written"
    changes = [e for e in events if e.from_status != e.to_status]

    # The log is a chain from "pending" to the row's status...
    assert events[0].from_status == S.PENDING
    for before, after in itertools.pairwise(events):
        assert after.from_status == before.to_status, (before, after)
    assert events[-1].to_status == row.status
    # ... of legal moves, each one version and one newer fencing token further.
    for event in changes:
        assert event.to_status in TRANSITIONS[event.from_status], event
    assert [e.version for e in changes] == list(range(1, len(changes) + 1))
    tokens = [e.fencing_token for e in changes]
    assert tokens == sorted(set(tokens)), tokens
    assert row.fencing_token == tokens[-1]

    # Replaying the log gives the row.
    status, n_changes, n_retries = replay(events)
    assert status == row.status
    assert n_changes == row.version == len(changes)
    assert n_retries == row.retry_count

    # Every accepted request wrote exactly one status change, and so did every successful claim:
    # nothing was lost, nothing was written twice.
    by_clients = [e for e in changes if e.actor == "user:racer"]
    by_claimer = [e for e in changes if e.actor == "agent:racer-agent"]
    assert len(by_clients) == codes[202]
    assert len(by_claimer) == sum(claims)
    assert len(by_clients) + len(by_claimer) == len(changes)
    accepted = Counter(action for action, response in responses if response.status_code == 202)
    assert Counter(action_of(e) for e in by_clients) == accepted
    # Each operation moved the session only from where it means something.
    sources = {"start": {S.PENDING}, "resume": {S.PAUSED}, "retry": RETRYABLE}
    for event in by_clients:
        assert event.from_status in sources.get(action_of(event), S.values), event

    # The race really raced: conflicts were turned away and the session moved several times.
    assert codes[409] >= 1, codes
    assert len(changes) >= 3, [str(e) for e in changes]
    print(
        f"R5: {len(responses)} requests in {elapsed:.1f}s: {dict(codes)}; accepted {dict(accepted)}; "
        f"{len(claims)} claims ({sum(claims)} moved it); {len(events)} events "
        f"({len(changes)} status changes, {n_retries} retries); final status {row.status}; "
        f"path {Counter(str(e) for e in changes).most_common()}"
    )
