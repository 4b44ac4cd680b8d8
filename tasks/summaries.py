"""Read-only summaries of the tasks, for the pages and the metrics: the task counts of a page of
sessions, the queues per capability, and a tenant's most frequent errors and slowest tasks.

Each is one query whatever the number of rows it summarises, so a page or a scrape that shows
them costs the same with five sessions or agents as with five hundred.
"""

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection
from django.db.models import Count, F
from django.utils import timezone

from orchestrator_project.redaction import redact
from sessions.models import Session

from .models import Task


def add_task_counts(sessions: list[Session]) -> None:
    """Give each session of a list page its task counts (`session._task_counts`, every status),
    in one query for the whole page."""
    counts = {session.pk: dict.fromkeys(Task.Status.values, 0) for session in sessions}
    rows = Task.objects.filter(session_id__in=counts).values_list("session_id", "status").annotate(Count("pk"))
    for session_id, status, n in rows.order_by():
        counts[session_id][status] = n
    for session in sessions:
        session._task_counts = counts[session.pk]


@dataclass(frozen=True)
class Queue:
    """The tasks of one capability in flight: waiting for an agent, and running."""

    queued: int = 0
    oldest_queued_at: datetime | None = None
    running: int = 0

    def oldest_age_s(self, now: datetime) -> float:
        """How long the oldest waiting task has waited (0: none waits)."""
        return (now - self.oldest_queued_at).total_seconds() if self.oldest_queued_at else 0.0


def queues() -> dict[str, Queue]:
    """Every capability with a task queued or running, across all tenants (the platform's queues)."""
    with connection.cursor() as cursor:
        # OR, not IN: PostgreSQL then reads the two partial indexes (task_queued,
        # task_running_agent), which hold only the tasks in flight, not an index of them all.
        cursor.execute(
            "SELECT capability, count(*) FILTER (WHERE status = 'queued'), min(queued_at) FILTER"
            " (WHERE status = 'queued'), count(*) FILTER (WHERE status = 'running') FROM tasks_task"
            " WHERE status = 'queued' OR status = 'running' GROUP BY capability"
        )
        return {capability: Queue(queued, oldest, running) for capability, queued, oldest, running in cursor}


@dataclass
class ErrorGroup:
    line: str  # the first line of the error, redacted and normalised
    count: int
    last_seen: datetime


# Parts of an error line that differ between occurrences of the same failure.
_VARIABLE = [
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I), "<id>"),
    (re.compile(r"\b0x[0-9a-f]+\b|\b[0-9a-f]{12,}\b", re.I), "<hex>"),
    (re.compile(r"\d+(?:\.\d+)*"), "N"),  # counts, durations, addresses, versions
]
# Distinct first lines read per page; the groups they form are merged after normalising.
ERROR_LINES_READ = 500
LINE_SHOWN = 300


def normalise_error_line(line: str) -> str:
    """`line` (already redacted) with ids, addresses and numbers replaced, so that the same
    failure of different tasks reads the same."""
    for pattern, replacement in _VARIABLE:
        line = pattern.sub(replacement, line)
    return " ".join(line.split())[:LINE_SHOWN]


def top_errors(tenant_id: int, *, hours: int = 24, limit: int = 10) -> list[ErrorGroup]:
    """The tenant's failed tasks of the last `hours`, grouped by the first line of their error,
    most frequent first.

    The database groups by the line as written (one row per distinct line, the most frequent
    ERROR_LINES_READ); each is redacted before it is normalised, so that a secret is recognised
    whole and not first cut into pieces that no longer look like one, and the lines that then
    read the same are merged."""
    since = timezone.now() - timedelta(hours=hours)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT split_part(btrim(t.error, E' \\t\\r\\n'), E'\\n', 1) AS line, count(*), max(t.finished_at)"
            " FROM tasks_task t JOIN agent_sessions_session s ON s.id = t.session_id"
            " WHERE s.tenant_id = %s AND t.status = 'failed' AND t.finished_at >= %s"
            " GROUP BY line ORDER BY count(*) DESC, max(t.finished_at) DESC LIMIT %s",
            [tenant_id, since, ERROR_LINES_READ],
        )
        rows = cursor.fetchall()
    groups: dict[str, ErrorGroup] = {}
    for line, count, last_seen in rows:
        key = normalise_error_line(redact(line)) or "(no error text)"
        group = groups.setdefault(key, ErrorGroup(key, 0, last_seen))
        group.count += count
        group.last_seen = max(group.last_seen, last_seen)
    return sorted(groups.values(), key=lambda g: (-g.count, -g.last_seen.timestamp()))[:limit]


def slowest_tasks(tenant_id: int, *, hours: int = 24, limit: int = 10) -> list[Task]:
    """The tenant's tasks that finished (completed or failed) in the last `hours` and ran
    longest, with `duration` (a timedelta) and their session's title and agent's name."""
    since = timezone.now() - timedelta(hours=hours)
    return list(
        Task.objects.filter(
            session__tenant_id=tenant_id,
            status__in=(Task.Status.COMPLETED, Task.Status.FAILED),
            finished_at__gte=since,
            started_at__isnull=False,
        )
        .annotate(duration=F("finished_at") - F("started_at"))
        .select_related("session", "agent")
        .only("key", "title", "status", "capability", "started_at", "finished_at", "session__title", "agent__name")
        .order_by("-duration", "pk")[:limit]
    )
