"""Fair share of the shared capability queues across tenants (tasks/fairshare.py, docs/ROUTING.md).

The dispatch and release paths are the real ones, on the test database and the test broker; a
task "finishes" here by its row moving to completed, as the record statement would."""

from datetime import timedelta

import pytest
from celery.canvas import Signature
from django.conf import settings
from django.test import override_settings
from django.utils import timezone
from kombu.exceptions import OperationalError

from agents.models import Agent
from sessions.models import Session
from tasks import fairshare
from tasks.lifecycle import dispatch_session, retry_session
from tasks.messages import backlog_priority
from tasks.models import Task
from tasks.release import release_held, release_ready_tasks, resend_queued_task
from tasks.sweeps import sweep_stuck_sessions
from tenants.models import Membership, Tenant

from .conftest import at_once, create_and_start, member_client, queued_broker_messages, run_task_message_ids, wait_until

CAP = "code_generation"


def online_agent(concurrency: int, name: str = "pool") -> Agent:
    return Agent.objects.create(
        name=name, capabilities=[CAP], concurrency=concurrency, status=Agent.Status.ONLINE,
        last_heartbeat=timezone.now(),
    )  # fmt: skip


def ready_session(slug: str, count: int, *, priority: int = 5, weight: int = 1, deps=None) -> Session:
    """A started session of `count` tasks (independent unless `deps` says otherwise): ready ones
    are queued, none is sent yet."""
    tenant, _ = Tenant.objects.get_or_create(slug=slug, defaults={"name": slug, "weight": weight})
    session = Session.objects.create(
        tenant=tenant, title=f"{slug} p{priority}", requirements="r", status=Session.Status.QUEUED, priority=priority
    )
    tasks = [
        Task.objects.create(session=session, key=f"t{i}", title=f"t{i}", capability=CAP, position=i)
        for i in range(count)
    ]
    for key, ups in (deps or {}).items():
        task = next(t for t in tasks if t.key == key)
        task.depends_on.set([t for t in tasks if t.key in ups])
        Task.objects.filter(pk=task.pk).update(upstream_open=len(ups))
    release_ready_tasks(session.pk)
    return session


def neighbour_in_flight() -> Session:
    """Another tenant with one task of the capability in flight (its message out): no tenant
    dispatched after it is alone on the capability, so fair share holds what does not fit."""
    neighbour = ready_session("initech", 1)
    neighbour.tasks.update(message_id="initech.1", dispatched_to=f"cap.{CAP}")
    return neighbour


def first_consumed(priority: int, other: int) -> bool:
    """Whether a message of broker priority `priority` is consumed before one of `other`: Redis
    consumes 0 first, RabbitMQ 9."""
    return priority < other if settings.BROKER_PRIORITY_INVERTED else priority > other


def dispatch(session: Session, capture) -> None:
    with capture(execute=True):
        dispatch_session(session.pk)


def sent(session: Session) -> list[Task]:
    return list(session.tasks.filter(status=Task.Status.QUEUED).exclude(message_id="").order_by("position"))


def held(session: Session) -> int:
    return session.tasks.filter(fairshare.HELD).count()


def finish(task: Task, capture) -> int:
    Task.objects.filter(pk=task.pk).update(status=Task.Status.COMPLETED, finished_at=timezone.now())
    with capture(execute=True):
        return release_held(CAP)


def test_a_tenant_alone_sends_a_canvas_too_wide_for_its_share_whole_as_a_backlog(
    db, django_capture_on_commit_callbacks
):
    online_agent(concurrency=2)  # 2 slots x FAIR_SHARE_BURST 1.5: a share of 3 in flight
    flood = ready_session("acme", 10, priority=9)

    dispatch(flood, django_capture_on_commit_callbacks)

    # No other tenant has work for the capability: the 10-wide canvas goes out at once.
    assert len(sent(flood)) == 10 and held(flood) == 0
    assert flood.tasks.filter(via_canvas=True).count() == 10
    messages = queued_broker_messages("cap.*")
    assert sorted(m["headers"]["id"] for m in messages) == sorted(t.message_id for t in sent(flood))
    # Below every share's priority, ordered by the session's among backlogs.
    assert {m["properties"]["priority"] for m in messages} == {backlog_priority(9)}
    assert first_consumed(settings.CELERY_TASK_DEFAULT_PRIORITY, backlog_priority(9))
    assert first_consumed(backlog_priority(9), backlog_priority(7))
    flood.refresh_from_db()
    assert flood.canvas_width == {CAP: 10} and flood.canvas_backlog  # its settling frees the capability


def test_a_tenant_with_company_sends_its_share_of_the_slots_and_holds_the_rest(db, django_capture_on_commit_callbacks):
    online_agent(concurrency=2)  # 3 in flight for two tenants of weight 1: a share of 2 each
    neighbour_in_flight()
    flood = ready_session("acme", 10)

    dispatch(flood, django_capture_on_commit_callbacks)

    assert len(sent(flood)) == 2 and held(flood) == 8
    assert sorted(run_task_message_ids()) == sorted(t.message_id for t in sent(flood))
    # Too wide for a canvas in that share: the database released every task.
    flood.refresh_from_db()
    assert flood.canvas_width == {} and not flood.tasks.filter(via_canvas=True).exists()


def test_another_tenants_task_goes_at_once_ahead_of_a_lone_tenants_backlog(db, django_capture_on_commit_callbacks):
    online_agent(concurrency=2)
    flood = ready_session("acme", 10, priority=9)
    dispatch(flood, django_capture_on_commit_callbacks)
    calm = ready_session("globex", 1, priority=0)

    dispatch(calm, django_capture_on_commit_callbacks)

    [mine] = [m for m in queued_broker_messages("cap.*") if m["headers"]["id"] == sent(calm)[0].message_id]
    # Within its share, at the one priority every share has: consumed before all 10 of the
    # flood's, whose session priority is 9 and its own 0.
    assert mine["properties"]["priority"] == settings.CELERY_TASK_DEFAULT_PRIORITY
    assert first_consumed(mine["properties"]["priority"], backlog_priority(9))
    calm.refresh_from_db()
    assert calm.canvas_width == {CAP: 1} and not calm.canvas_backlog  # counted in the calm tenant's share
    # The flood's own later work is within its share too (the backlog counts against none): it
    # goes ahead of the backlog, whatever the sessions' priorities.
    more = ready_session("acme", 1, priority=2)
    dispatch(more, django_capture_on_commit_callbacks)
    [own] = [m for m in queued_broker_messages("cap.*") if m["headers"]["id"] == sent(more)[0].message_id]
    assert own["properties"]["priority"] == settings.CELERY_TASK_DEFAULT_PRIORITY


def test_while_a_backlog_waits_the_shares_leave_its_tenant_its_weight_of_the_slots(
    db, django_capture_on_commit_callbacks
):
    online_agent(concurrency=4)
    backlog = ready_session("acme", 20)
    dispatch(backlog, django_capture_on_commit_callbacks)
    others = [ready_session(slug, 10) for slug in ("globex", "initech")]
    for session in others:
        dispatch(session, django_capture_on_commit_callbacks)

    # globex came with one tenant beside it (floor(4 / 2) = 2), initech with two (floor(4 / 3) = 1).
    assert [(len(sent(s)), held(s)) for s in others] == [(2, 8), (1, 9)]
    backlog.refresh_from_db()
    assert backlog.canvas_backlog and len(sent(backlog)) == 20
    # globex's task finishes: it is at its 1 of 4 now, and the slot is the backlog's. With the
    # burst, each later tenant would have ceil(6 / 3) = 2: every slot, and the backlog would starve.
    assert finish(sent(others[0])[0], django_capture_on_commit_callbacks) == 0


def test_a_tenant_that_holds_work_runs_no_backlog_past_it(db, django_capture_on_commit_callbacks):
    online_agent(concurrency=2)  # a share of 3
    urgent = ready_session("acme", 7, priority=9)
    Task.objects.filter(session=urgent).update(message_id="", via_canvas=False)  # released by the database
    with django_capture_on_commit_callbacks(execute=True):
        assert release_held(CAP) == 3  # its share; 4 held
    wide = ready_session("acme", 10, priority=1)

    dispatch(wide, django_capture_on_commit_callbacks)

    # A backlog would put the wide session's 10 on the queue ahead of the urgent one's 4, which
    # wait for a slot; released by the database instead, they wait behind them.
    wide.refresh_from_db()
    assert not wide.canvas_backlog and held(wide) == 10 and held(urgent) == 4
    assert finish(sent(urgent)[0], django_capture_on_commit_callbacks) == 1
    assert (held(urgent), held(wide)) == (3, 10)


@pytest.mark.django_db(transaction=True)
def test_tenants_dispatched_at_once_never_both_get_a_backlog():
    online_agent(concurrency=2)
    sessions = [ready_session(slug, 8) for slug in ("acme", "globex", "initech", "umbrella")]
    _, errors = at_once([lambda session=session: dispatch_session(session.pk) for session in sessions])

    # The first under the lock is alone and sends a backlog; each later one sees it and is held.
    assert errors == []
    assert Session.objects.filter(pk__in=[s.pk for s in sessions], canvas_backlog=True).count() == 1


def test_a_freed_slot_sends_the_tenants_most_urgent_held_task(db, django_capture_on_commit_callbacks):
    online_agent(concurrency=2)  # a share of 2 beside the neighbour
    neighbour_in_flight()
    calm = ready_session("acme", 5, priority=1)
    dispatch(calm, django_capture_on_commit_callbacks)
    urgent = ready_session("acme", 2, priority=8)
    dispatch(urgent, django_capture_on_commit_callbacks)
    assert (len(sent(calm)), held(calm), held(urgent)) == (2, 3, 2)

    assert finish(sent(calm)[0], django_capture_on_commit_callbacks) == 1

    assert len(sent(urgent)) == 1 and held(calm) == 3


@override_settings(FAIR_SHARE_BURST=1.0)
def test_slots_are_shared_by_weight_and_the_tenant_furthest_below_its_share_goes_next(
    db, django_capture_on_commit_callbacks
):
    online_agent(concurrency=4)
    light, heavy = ready_session("light", 10, weight=1), ready_session("heavy", 10, weight=3)
    # Queued, never sent: held, as a flood's tasks are once the database released them.
    Task.objects.filter(session__in=[light, heavy]).update(message_id="", via_canvas=False)

    with django_capture_on_commit_callbacks(execute=True):
        assert release_held(CAP) == 4

    assert (len(sent(light)), len(sent(heavy))) == (1, 3)  # 4 slots, weights 1:3
    # The heavy tenant's task finishes: its slot is its own again, the light tenant has its share.
    assert finish(sent(heavy)[0], django_capture_on_commit_callbacks) == 1
    assert (len(sent(light)), len(sent(heavy))) == (1, 3)


def test_a_canvas_runs_if_its_peak_width_fits_and_counts_what_it_has_sent(db, django_capture_on_commit_callbacks):
    online_agent(concurrency=4)  # 6 in flight for two tenants: a share of 3 each
    neighbour_in_flight()
    diamond = ready_session("acme", 5, deps={"t1": ["t0"], "t2": ["t0"], "t3": ["t0"], "t4": ["t1", "t2", "t3"]})
    dispatch(diamond, django_capture_on_commit_callbacks)
    diamond.refresh_from_db()
    assert diamond.canvas_width == {CAP: 3} and diamond.tasks.filter(via_canvas=True).count() == 5

    wide = ready_session("acme", 6)
    dispatch(wide, django_capture_on_commit_callbacks)

    # The diamond has one message out (its first node): room for 2 of 6, so no canvas for them.
    wide.refresh_from_db()
    assert wide.canvas_width == {} and len(sent(wide)) == 2 and held(wide) == 4


def test_held_tasks_are_not_resent_as_lost_and_the_sweep_sends_them_when_room_appears(
    db, django_capture_on_commit_callbacks
):
    neighbour_in_flight()
    flood = ready_session("acme", 5)  # no live agent: one slot's worth (1.5) for two, 1 each
    dispatch(flood, django_capture_on_commit_callbacks)
    assert len(sent(flood)) == 1 and held(flood) == 4
    flood.tasks.update(queued_at=timezone.now() - timedelta(hours=1))

    with django_capture_on_commit_callbacks(execute=True):
        done = sweep_stuck_sessions()
    assert (done["resent"], done["released_held"]) == (0, 0)

    online_agent(concurrency=4)  # a share of 3 each
    with django_capture_on_commit_callbacks(execute=True):
        assert sweep_stuck_sessions()["released_held"] == 2
    assert held(flood) == 2 and len(run_task_message_ids()) == 3


@pytest.mark.django_db(transaction=True)
def test_racing_releases_never_send_more_than_the_share():
    online_agent(concurrency=2)
    flood = ready_session("acme", 30)
    Task.objects.filter(session=flood).update(message_id="", via_canvas=False)
    sent_counts, errors = at_once([lambda: release_held(CAP)] * 8)

    assert errors == [] and sum(sent_counts) == 3
    assert len(sent(flood)) == 3 and len(run_task_message_ids()) == 3


@pytest.mark.e2e
@pytest.mark.every_broker
def test_on_real_workers_a_calm_tenants_task_overtakes_a_priority_9_flood(stack):
    stack.agent("shared", ["code_generation"], concurrency=2)
    # An operator may set priority 9 (a developer's quota stops at 5).
    flooder, calm = member_client("acme", "alice", Membership.Role.OPERATOR), member_client("globex", "bob")
    flood = {
        "title": "flood",
        "requirements": "many slow tasks",
        "priority": 9,
        "tasks": [
            {"key": f"t{i}", "title": f"t{i}", "capability": CAP, "params": {"duration_s": 0.3}} for i in range(30)
        ],
    }
    flood_id = create_and_start(flooder, flood)
    flood_tasks = Task.objects.filter(session_id=flood_id)
    wait_until(lambda: flood_tasks.filter(started_at__isnull=False).exists(), what="the flood running")
    asked = timezone.now()

    lone_id = create_and_start(
        calm,
        {
            "title": "one",
            "requirements": "one task",
            "priority": 0,
            "tasks": [{"key": "a", "title": "a", "capability": CAP}],
        },
    )

    lone = Task.objects.filter(session_id=lone_id)
    wait_until(lambda: lone.filter(status=Task.Status.COMPLETED).exists(), timeout=60, what="the calm task done")
    started = lone.get().started_at
    overtook = flood_tasks.filter(started_at__gt=asked, started_at__lt=started).count()
    # The flood, alone when it started, went out whole as a backlog: all 30 messages on the
    # queue, below the priority of the calm tenant's share. Only what the agent's two processes
    # had taken went first; without fair share it was every one of the 30, all ahead on the
    # queue and at a higher priority.
    assert flood_tasks.filter(via_canvas=True).count() == 30
    assert overtook <= 3
    assert flood_tasks.filter(status__in=[Task.Status.QUEUED, Task.Status.PENDING]).exists()


def test_canvas_nodes_sent_again_are_counted_once_and_never_held_behind_their_own_canvas(
    db, django_capture_on_commit_callbacks
):
    online_agent(concurrency=2)  # a share of 3
    sessions = [ready_session("acme", 1) for _ in range(3)]
    for session in sessions:
        dispatch(session, django_capture_on_commit_callbacks)
    assert [s.tasks.get().via_canvas for s in sessions] == [True] * 3

    # Their messages were lost (a broker restart): each is sent again and leaves its canvas.
    for session in sessions:
        with django_capture_on_commit_callbacks(execute=True):
            assert resend_queued_task(session.tasks.get(), queued_at=timezone.now())

    assert [held(s) for s in sessions] == [0, 0, 0]
    assert all(len(sent(s)) == 1 and not s.tasks.get().via_canvas for s in sessions)


def test_pinned_tasks_neither_count_against_the_share_nor_wait_for_it(db, django_capture_on_commit_callbacks):
    online_agent(concurrency=2)  # a share of 2 beside the neighbour
    neighbour_in_flight()
    pinned = ready_session("acme", 3)
    pinned.tasks.update(pinned_agent="gpu-box")  # an agent of its own queue, offline: they wait there
    dispatch(pinned, django_capture_on_commit_callbacks)
    free = ready_session("acme", 2)

    dispatch(free, django_capture_on_commit_callbacks)

    # Had the 3 pinned counted, the 2 free ones would not fit the share of 2: held, not sent.
    assert len(sent(pinned)) == 3 and len(sent(free)) == 2 and held(free) == 0


def test_what_leaves_a_canvas_waits_for_the_database_without_the_canvas_message_ids(
    db, django_capture_on_commit_callbacks
):
    online_agent(concurrency=4)
    chain = ready_session("acme", 3, deps={"t1": ["t0"], "t2": ["t1"]})
    dispatch(chain, django_capture_on_commit_callbacks)
    assert chain.tasks.exclude(message_id="").count() == 3  # every canvas node has its id

    with django_capture_on_commit_callbacks(execute=True):
        assert resend_queued_task(chain.tasks.get(key="t0"), queued_at=timezone.now())

    later = chain.tasks.filter(key__in=["t1", "t2"])
    assert list(later.values_list("via_canvas", "message_id")) == [(False, ""), (False, "")]


def test_has_held_in_sql_agrees_with_the_held_filter_for_every_kind_of_row(db):
    """has_held is HELD written in SQL for the hot path: each way a queued task is not held
    (sent, a canvas node, pinned, another capability, not queued) must read as not held."""
    session = ready_session("acme", 1)
    task = session.tasks.get()
    not_held = [
        {"message_id": "m.1"},
        {"via_canvas": True},
        {"pinned_agent": "pool"},
        {"capability": "testing"},
        {"status": Task.Status.RUNNING},
    ]
    held_row = {
        "status": Task.Status.QUEUED,
        "message_id": "",
        "via_canvas": False,
        "pinned_agent": "",
        "capability": CAP,
    }
    for change in not_held:
        Task.objects.filter(pk=task.pk).update(**{**held_row, **change})
        assert fairshare.has_held(CAP) is Task.objects.filter(fairshare.HELD, capability=CAP).exists() is False
    Task.objects.filter(pk=task.pk).update(**held_row)
    assert fairshare.has_held(CAP) is Task.objects.filter(fairshare.HELD, capability=CAP).exists() is True


def test_the_slots_are_those_of_live_undrained_worker_agents_with_the_capability(db):
    """LOADS counts the slots in SQL: each agent that must not count, and one that must."""
    now = timezone.now()
    online_agent(concurrency=2, name="counts")
    online_agent(concurrency=8, name="draining")
    online_agent(concurrency=8, name="offline")
    online_agent(concurrency=8, name="silent")
    online_agent(concurrency=8, name="external")
    online_agent(concurrency=8, name="other-capability")
    Agent.objects.filter(name="draining").update(status=Agent.Status.DRAINING)
    Agent.objects.filter(name="offline").update(status=Agent.Status.OFFLINE)
    Agent.objects.filter(name="silent").update(last_heartbeat=now - timedelta(hours=1))
    Agent.objects.filter(name="external").update(mode=Agent.Mode.PUSH)
    Agent.objects.filter(name="other-capability").update(capabilities=["testing"])
    live = [
        a for a in Agent.objects.all()
        if a.mode == Agent.Mode.WORKER and a.status in (Agent.Status.ONLINE, Agent.Status.BUSY)
        and CAP in a.capabilities and a.is_live
    ]  # fmt: skip
    assert [a.name for a in live] == ["counts"]
    tenant = Tenant.objects.create(slug="acme", name="acme")

    [load] = fairshare.loads(CAP, {tenant.pk: 1}).values()

    assert load.limit == 3  # 2 slots x FAIR_SHARE_BURST 1.5


def test_chosen_tasks_the_broker_did_not_take_are_held_again_for_the_next_release(transactional_db, monkeypatch):
    """release_held chooses under the lock and sends after it: a send that fails (the broker
    here, an edge we do not own) leaves that task and those after it held, not stranded with a
    message id that no message carries."""
    online_agent(concurrency=2)  # a share of 2 beside the neighbour
    neighbour_in_flight()
    flood = ready_session("acme", 6)
    dispatch_session(flood.pk)
    first = sent(flood)
    assert len(first) == 2 and held(flood) == 4
    Task.objects.filter(pk__in=[t.pk for t in first[:2]]).update(status=Task.Status.COMPLETED)
    publish, calls = Signature.apply_async, []

    def broker_fails_the_second_time(self, *args, **kwargs):
        calls.append(kwargs.get("task_id"))
        if len(calls) == 2:
            raise OperationalError("the broker went away")
        return publish(self, *args, **kwargs)

    monkeypatch.setattr(Signature, "apply_async", broker_fails_the_second_time)

    with pytest.raises(OperationalError):
        release_held(CAP)

    assert held(flood) == 3  # two slots freed: one sent, the other held again
    [went] = [t for t in sent(flood) if t.pk not in {f.pk for f in first}]
    assert went.message_id == calls[0] and went.message_id in run_task_message_ids()
    monkeypatch.setattr(Signature, "apply_async", publish)
    assert release_held(CAP) == 1 and held(flood) == 2


def test_a_retried_backlog_is_no_backlog_until_dispatch_decides_again(db, django_capture_on_commit_callbacks):
    online_agent(concurrency=2)
    flood = ready_session("acme", 10)
    dispatch(flood, django_capture_on_commit_callbacks)
    flood.refresh_from_db()
    assert flood.canvas_backlog
    Session.objects.filter(pk=flood.pk).update(status=Session.Status.FAILED)
    flood.refresh_from_db()

    retry_session(flood, actor="test")  # its dispatch waits for the commit, not run here

    # Its re-queued tasks count as the tenant's own, not as a backlog that lowers the others' shares.
    flood.refresh_from_db()
    assert not flood.canvas_backlog
    [load] = fairshare.loads(CAP).values()
    assert load.backlog == 0
