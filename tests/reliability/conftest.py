"""The stack the chaos tests break: the `stack` fixture's workers plus one Beat that runs every
sweep each second, so that recovery is quick enough to watch."""

import pytest
from django.apps import apps
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from orchestrator_project.schedules import sync_schedules
from sessions.models import SETTLED, Session


def schedule_every_second() -> None:
    # A test before this one may have flushed the tables the migrations filled.
    sync_schedules(apps)
    every_second, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.filter(queue="housekeeping").update(interval=every_second, expire_seconds=5)


@pytest.fixture
def sweeping(stack):
    schedule_every_second()
    stack.beat("beat")
    return stack


def settled(session_ids) -> dict[str, str]:
    """The sessions among `session_ids` that reached a settled status, with that status."""
    rows = Session.objects.filter(pk__in=session_ids, status__in=SETTLED).values_list("pk", "status")
    return {str(pk): status for pk, status in rows}
