"""GET /metrics: this web group's metrics, and the state that lives in the database, read once per
scrape by one collector (never kept as gauges in many processes).

The queries on sessions and tasks read what is in flight (partial indexes on queued and running
tasks, the sessions not settled), so a scrape costs the same however much history is stored; the
agents are read whole, one row each. The queues are read by tasks.summaries.queues, which the
console's fleet page shows too.
"""

import hmac

from django.conf import settings
from django.db import connection
from django.http import HttpResponse
from django.utils import timezone
from django_celery_beat.models import PeriodicTask
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily

from agents.capabilities import CAPABILITIES
from agents.models import Agent
from orchestrator_project import metrics
from orchestrator_project.schedules import SCHEDULES
from sessions.models import SETTLED, Status
from tasks import summaries

LOOPBACK = ("127.0.0.1", "::1")
SWEEPS = [spec["task"] for spec in SCHEDULES]
UNSETTLED = sorted(set(Status.values) - {str(s) for s in SETTLED})


class DatabaseCollector:
    """Sessions by status, the queues per capability, the fleet, and each sweep's period."""

    def collect(self):
        now = timezone.now()
        yield from self._sessions()
        yield from self._queues(now)
        yield from self._agents(now)
        yield from self._sweeps()

    def _sessions(self):
        sessions = GaugeMetricFamily("orch_sessions", "Sessions not settled, by status.", labels=["status"])
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT status, count(*) FROM agent_sessions_session WHERE status = ANY(%s) GROUP BY status",
                [UNSETTLED],
            )
            counts = dict(cursor.fetchall())
        for status in UNSETTLED:
            sessions.add_metric([status], counts.get(status, 0))
        yield sessions

    def _queues(self, now):
        depth = GaugeMetricFamily(
            "orch_queue_depth", "Tasks ready and waiting for an agent, per capability.", labels=["capability"]
        )
        oldest = GaugeMetricFamily(
            "orch_queue_oldest_age_seconds",
            "How long the oldest task waiting for an agent has waited, per capability (0: none waits).",
            labels=["capability"],
        )
        running = GaugeMetricFamily("orch_tasks_running", "Tasks running, per capability.", labels=["capability"])
        in_flight = summaries.queues()
        for capability in sorted(set(CAPABILITIES) | set(in_flight)):
            queue = in_flight.get(capability, summaries.Queue())
            depth.add_metric([capability], queue.queued)
            oldest.add_metric([capability], queue.oldest_age_s(now))
            running.add_metric([capability], queue.running)
        yield from (depth, oldest, running)

    def _agents(self, now):
        heartbeat = GaugeMetricFamily(
            "orch_agent_last_heartbeat_timestamp_seconds",
            "When each agent last sent a heartbeat (Unix time).",
            labels=["agent", "executor"],
        )
        up = GaugeMetricFamily(
            "orch_agent_up", "1 when the agent is online (idle or busy), else 0.", labels=["agent", "executor"]
        )
        status = GaugeMetricFamily(
            "orch_agent_status",
            "Each agent's status: 1 for the one it is in, 0 for the others.",
            labels=["agent", "status"],
        )
        load = GaugeMetricFamily("orch_agent_load", "Tasks the agent runs now.", labels=["agent"])
        concurrency = GaugeMetricFamily("orch_agent_concurrency", "Tasks the agent may run at once.", labels=["agent"])
        online = GaugeMetricFamily(
            "orch_capability_agents_online", "Agents online that offer each capability.", labels=["capability"]
        )
        per_capability = dict.fromkeys(CAPABILITIES, 0)
        rows = Agent.objects.values_list(
            "name", "executor", "status", "current_load", "concurrency", "capabilities", "last_heartbeat"
        )
        for name, executor, agent_status, current_load, agent_concurrency, capabilities, last_heartbeat in rows:
            is_up = agent_status in (Agent.Status.ONLINE, Agent.Status.BUSY)
            if last_heartbeat:
                heartbeat.add_metric([name, executor], last_heartbeat.timestamp())
            up.add_metric([name, executor], int(is_up))
            for each in Agent.Status.values:
                status.add_metric([name, each], int(each == agent_status))
            load.add_metric([name], current_load)
            concurrency.add_metric([name], agent_concurrency)
            for capability in capabilities or []:
                per_capability[capability] = per_capability.get(capability, 0) + int(is_up)
        for capability, count in sorted(per_capability.items()):
            online.add_metric([capability], count)
        yield from (heartbeat, up, status, load, concurrency, online)

    def _sweeps(self):
        # As Beat runs them (the schedule an operator may edit in the admin), in seconds; our
        # sweeps only (an operator's own periodic task records no success), the most frequent
        # schedule of each.
        period = GaugeMetricFamily("orch_sweep_period_seconds", "How often Beat runs each sweep.", labels=["sweep"])
        seconds = {"microseconds": 1e-6, "seconds": 1, "minutes": 60, "hours": 3600, "days": 86400}
        ours = PeriodicTask.objects.filter(enabled=True, interval__isnull=False, task__in=SWEEPS)
        periods: dict[str, float] = {}
        for task, every, unit in ours.values_list("task", "interval__every", "interval__period"):
            periods[task] = min(periods.get(task, float("inf")), every * seconds[unit])
        for task, every_s in sorted(periods.items()):
            period.add_metric([task], every_s)
        yield period


def _allowed(request) -> bool:
    if settings.METRICS_TOKEN:
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {settings.METRICS_TOKEN}".encode())
    return settings.DEBUG and request.META.get("REMOTE_ADDR") in LOOPBACK


def metrics_view(request):
    if not metrics.enabled():
        return HttpResponse("metrics are off (METRICS_ENABLED=false)\n", status=404, content_type="text/plain")
    if not _allowed(request):
        return HttpResponse("metrics need the scrape token (METRICS_TOKEN)\n", status=403, content_type="text/plain")
    registry = metrics.group_registry()
    registry.register(DatabaseCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
