"""Every (from, to) pair of the state machine (docs/ARCHITECTURE.md), legal and illegal, through Session.transition."""

import itertools
import time

import pytest

from orchestrator_project.locking import StaleFencingToken
from orchestrator_project.redis_client import redis_client
from sessions import feed
from sessions.locking import session_lock
from sessions.models import TRANSITIONS, InvalidTransition, Session, SessionEvent
from tenants.models import Tenant

S = Session.Status

# The table of docs/ARCHITECTURE.md written out again, independently of the code's table, so a typo in either fails.
LEGAL = {
    ("pending", "queued"),
    ("pending", "cancelled"),
    ("pending", "failed"),
    ("queued", "running"),
    ("queued", "paused"),
    ("queued", "cancelled"),
    ("queued", "failed"),
    ("queued", "orphaned"),
    *(
        (source, target)
        for source in ("running", "degraded")
        for target in ("completed", "partially_completed", "failed", "timeout", "paused", "stopped", "orphaned")
    ),
    ("running", "degraded"),
    ("degraded", "running"),
    ("paused", "queued"),
    ("paused", "running"),
    ("paused", "stopped"),
    ("paused", "cancelled"),
    ("failed", "queued"),
    ("timeout", "queued"),
    ("stopped", "queued"),
    ("orphaned", "queued"),
}
ALL_PAIRS = list(itertools.product(S.values, S.values))


def make_session(status: str, **fields) -> Session:
    tenant, _ = Tenant.objects.get_or_create(slug="acme", defaults={"name": "Acme"})
    return Session.objects.create(tenant=tenant, title="t", requirements="r", status=status, **fields)


def test_the_code_table_is_design_section_4():
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == LEGAL


@pytest.mark.parametrize(("source", "target"), sorted(LEGAL))
def test_legal_transition_writes_status_version_token_and_event(db, source, target):
    session = make_session(source)

    event = session.transition(target, reason="test", actor="tester")

    row = Session.objects.get(pk=session.pk)
    assert row.status == target
    assert row.version == 1
    assert row.fencing_token == event.fencing_token > 0
    stored = SessionEvent.objects.get(session=row)
    assert (stored.from_status, stored.to_status, stored.actor, stored.version) == (source, target, "tester", 1)


@pytest.mark.parametrize(("source", "target"), sorted(set(ALL_PAIRS) - LEGAL))
def test_illegal_transition_raises_and_changes_nothing(db, source, target):
    session = make_session(source)

    with pytest.raises(InvalidTransition) as raised:
        session.transition(target, reason="test")

    assert raised.value.allowed == sorted(TRANSITIONS[source])
    row = Session.objects.get(pk=session.pk)
    assert (row.status, row.version) == (source, 0)
    assert not SessionEvent.objects.filter(session=row).exists()


def test_retry_stops_at_max_retries(db):
    session = make_session(S.FAILED, max_retries=1, retry_count=1)

    with pytest.raises(InvalidTransition, match="retry limit"):
        session.transition(S.QUEUED, reason="retry")

    assert Session.objects.get(pk=session.pk).status == S.FAILED


def test_retry_counts_and_sets_a_new_deadline(db):
    session = make_session(S.TIMEOUT, max_retries=2)

    session.transition(S.QUEUED, reason="retry")

    row = Session.objects.get(pk=session.pk)
    assert row.retry_count == 1
    assert row.deadline is not None and row.finished_at is None


def test_a_holder_whose_lease_expired_cannot_write_after_the_next_holder(db, settings):
    settings.SESSION_LOCK_TTL_SECONDS = 1
    session = make_session(S.PENDING)

    with session_lock(session.pk) as stale:
        time.sleep(1.2)  # the lease runs out while this holder is stalled
        session.transition(S.QUEUED, reason="the next holder")
        row = Session.objects.get(pk=session.pk)
        with pytest.raises(StaleFencingToken):
            stale.check_against(row.fencing_token)

    assert Session.objects.get(pk=session.pk).status == S.QUEUED


def test_a_fencing_counter_lost_with_redis_is_rebased_above_the_row(db):
    session = make_session(S.PENDING)
    session.transition(S.QUEUED, reason="start")
    stored = Session.objects.get(pk=session.pk).fencing_token
    redis_client().flushdb()  # Redis restarted without persistence: the counter is gone

    event = session.transition(S.RUNNING, reason="claimed")

    assert event.fencing_token > stored
    assert Session.objects.get(pk=session.pk).fencing_token == event.fencing_token


def test_only_from_leaves_a_session_that_moved_on_alone(db):
    session = make_session(S.RUNNING)

    assert session.transition(S.RUNNING, reason="claimed", only_from=frozenset({S.QUEUED})) is None

    assert Session.objects.get(pk=session.pk).version == 0


def test_replaying_the_event_log_gives_the_row_status(db):
    session = make_session(S.PENDING)
    for target in (S.QUEUED, S.RUNNING, S.PAUSED, S.RUNNING, S.FAILED, S.QUEUED, S.RUNNING, S.COMPLETED):
        session.transition(target, reason="walk")

    status = S.PENDING
    for event in SessionEvent.objects.filter(session=session):
        assert event.from_status == status
        status = event.to_status
    assert status == Session.objects.get(pk=session.pk).status == S.COMPLETED


def test_events_are_append_only(db):
    session = make_session(S.PENDING)
    event = session.transition(S.QUEUED, reason="start")

    event.reason = "rewritten"
    with pytest.raises(ValueError, match="append-only"):
        event.save()


def test_transition_announces_the_change_after_commit(db, django_capture_on_commit_callbacks):
    session = make_session(S.PENDING)
    pubsub = redis_client().pubsub()
    pubsub.subscribe(feed.channel(session.tenant_id))
    pubsub.get_message(timeout=1)  # the subscribe confirmation

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        session.transition(S.QUEUED, reason="start")
    assert pubsub.get_message(timeout=0.2) is None  # nothing before the commit
    for callback in callbacks:
        callback()

    message = pubsub.get_message(timeout=2)
    pubsub.close()
    assert message is not None and message["data"] == str(session.pk).encode()
