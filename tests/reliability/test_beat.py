"""R7: two Beat processes at once send each periodic task once per period, and the second
takes over when the leader dies."""

import os
import signal
import time
from collections import Counter

import pytest
from django.apps import apps
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from orchestrator_project.schedules import SCHEDULES, sync_schedules
from tests.conftest import Stack, queued_broker_messages, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

LEADER_TTL_S = 6


def housekeeping_messages() -> list[dict]:
    """The periodic tasks' messages: nobody consumes the housekeeping queue in this test."""
    return queued_broker_messages("housekeeping*")


def sender_pid(message: dict) -> int:
    return int(message["headers"]["origin"].removeprefix("gen").split("@")[0])


PERIOD_S = 10


def test_two_beats_for_a_minute_send_each_sweep_once_per_period_and_fail_over(transactional_db):
    sync_schedules(apps)  # a test before this one may have flushed the tables the migrations filled
    # Every periodic task every 10 s (retention's hour would not come round in the test), so that
    # each of them shows whether one Beat sends it or two do.
    every_10_s, _ = IntervalSchedule.objects.get_or_create(every=PERIOD_S, period=IntervalSchedule.SECONDS)
    housekeeping = PeriodicTask.objects.filter(queue="housekeeping")
    housekeeping.update(interval=every_10_s, expire_seconds=PERIOD_S)
    assert set(housekeeping.values_list("task", flat=True)) == {spec["task"] for spec in SCHEDULES}
    stack = Stack()
    try:
        beats = [stack.beat(f"beat-{n}", {"BEAT_LEADER_TTL_SECONDS": str(LEADER_TTL_S)}) for n in (1, 2)]
        wait_until(housekeeping_messages, what="a first periodic task sent")
        time.sleep(30)
        [leader_pid] = {sender_pid(m) for m in housekeeping_messages()}  # one Beat sends
        os.kill(leader_pid, signal.SIGKILL)
        survivor = next(b for b in beats if b.pid != leader_pid)
        wait_until(
            lambda: survivor.pid in {sender_pid(m) for m in housekeeping_messages()},
            timeout=LEADER_TTL_S + 15,
            what="the second Beat to take over",
        )
        time.sleep(20)
    finally:
        stack.stop()

    sent = Counter(m["headers"]["task"] for m in housekeeping_messages())
    # About 65 s of sending at a 10 s period: one Beat sends each task 6-8 times, two would
    # send it about twice as often. The survivor sends at once what it believes is due.
    assert set(sent) == {spec["task"] for spec in SCHEDULES}
    for task, count in sent.items():
        assert 4 <= count <= 70 // PERIOD_S + 2, (task, count)
    assert {sender_pid(m) for m in housekeeping_messages()} == {leader_pid, survivor.pid}
