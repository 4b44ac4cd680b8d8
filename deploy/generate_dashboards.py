"""Write the Grafana dashboards under deploy/grafana/dashboards/ from the panel lists below.

Every panel reads the `${datasource}` variable, has a title, a description and a unit, and
windows its rates with `$__rate_interval` (tests/test_dashboards.py checks all of it, and every
query against promtool and the metrics we export).

    python -m deploy.generate_dashboards            # write the JSON files
    python -m deploy.generate_dashboards --check    # exit 1 if a committed file differs
"""

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

OUT = Path(__file__).resolve().parent / "grafana" / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The gauges read from the database come from every web replica alike: max, never sum, over them.
CAP = 'capability=~"$capability"'
API = 'view!~"metrics|health-.*"'
RI = "$__rate_interval"
# prometheus_client writes the bucket as le="60.0"; Prometheus 3 normalises it to "60".
LE_60 = 'le=~"60(\\\\.0)?"'


class Panel(NamedTuple):
    title: str
    description: str
    unit: str
    targets: list[tuple[str, str]]  # (expr, legend)
    kind: str = "timeseries"
    width: int = 12


OVERVIEW = [
    Panel(
        "Error budget left (30 days)",
        "Share of each SLO's 30-day error budget not yet spent (deploy/slo.yaml). Below 0: the SLO is broken.",
        "percentunit",
        [("slo:period_error_budget_remaining:ratio", "{{sloth_slo}}")],
        "stat",
    ),
    Panel(
        "Burn rate now (5 minutes)",
        "How many times faster than the budget allows each SLO spends it now; 14.4 over an hour pages.",
        "short",
        [("slo:current_burn_rate:ratio", "{{sloth_slo}}")],
        "stat",
    ),
    Panel(
        "SLI error ratio (1 hour)",
        "Bad events over all events of each SLO, over the last hour.",
        "percentunit",
        [("slo:sli_error:ratio_rate1h", "{{sloth_slo}}")],
    ),
    Panel(
        "Sessions not settled, by status",
        "Sessions in each unsettled status, read from the database at scrape time.",
        "short",
        [("max by (status) (orch_sessions)", "{{status}}")],
    ),
    Panel(
        "Session transitions",
        "Session status changes per second, by the status entered.",
        "ops",
        [(f"sum by (to_status) (rate(orch_session_transitions_total[{RI}]))", "{{to_status}}")],
    ),
    Panel(
        "Tasks finished, by outcome",
        "Tasks reaching an end per second: completed, failed, cancelled, skipped.",
        "ops",
        [(f"sum by (outcome) (rate(orch_tasks_finished_total[{RI}]))", "{{outcome}}")],
    ),
    Panel(
        "Failures and cancellations, by cause",
        "Whose doing each failed or cancelled task was; cause=orchestrator spends the failures SLO's budget.",
        "ops",
        [(f'sum by (cause) (rate(orch_tasks_finished_total{{outcome=~"failed|cancelled"}}[{RI}]))', "{{cause}}")],
    ),
    Panel(
        "API responses, by status",
        "API answers per second by HTTP status, without the /metrics scrapes and the health probes.",
        "reqps",
        [
            (
                f"sum by (status) (rate(django_http_responses_total_by_status_view_method_total{{{API}}}[{RI}]))",
                "{{status}}",
            )
        ],
    ),
    Panel(
        "API latency p99, by view",
        "The 99th percentile of the API's response time per view (django-prometheus).",
        "s",
        [
            (
                "histogram_quantile(0.99, sum by (view, le) "
                f"(rate(django_http_requests_latency_seconds_by_view_method_bucket{{{API}}}[{RI}])))",
                "{{view}}",
            )
        ],
    ),
]

TASK_FLOW = [
    Panel(
        "Queue depth",
        "Tasks ready and waiting for an agent, per capability.",
        "short",
        [(f"max by (capability) (orch_queue_depth{{{CAP}}})", "{{capability}}")],
    ),
    Panel(
        "Oldest queued task's wait",
        "How long the oldest waiting task of each capability has waited; QueuedTaskTooOld fires past 10 minutes.",
        "s",
        [(f"max by (capability) (orch_queue_oldest_age_seconds{{{CAP}}})", "{{capability}}")],
    ),
    Panel(
        "Live agents per capability",
        "Agents online or busy that offer each capability; 0 with a backlog fires CapabilityBacklogWithoutAgents.",
        "short",
        [(f"max by (capability) (orch_capability_agents_online{{{CAP}}})", "{{capability}}")],
    ),
    Panel(
        "Tasks running",
        "Tasks an agent runs now, per capability.",
        "short",
        [(f"max by (capability) (orch_tasks_running{{{CAP}}})", "{{capability}}")],
    ),
    Panel(
        "Tasks started",
        "Tasks an agent started per second, per capability.",
        "ops",
        [(f"sum by (capability) (rate(orch_task_schedule_to_start_seconds_count{{{CAP}}}[{RI}]))", "{{capability}}")],
    ),
    Panel(
        "Schedule to start, p99",
        "From ready (queued) to started, 99th percentile per capability.",
        "s",
        [
            (
                "histogram_quantile(0.99, sum by (capability, le) "
                f"(rate(orch_task_schedule_to_start_seconds_bucket{{{CAP}}}[{RI}])))",
                "{{capability}}",
            )
        ],
    ),
    Panel(
        "Started within 60 s",
        "Share of the tasks started that waited at most 60 s: the task-start SLO (99%) per capability.",
        "percentunit",
        [
            (
                f"sum by (capability) (rate(orch_task_schedule_to_start_seconds_bucket{{{CAP}, {LE_60}}}[{RI}]))\n"
                f"/ sum by (capability) (rate(orch_task_schedule_to_start_seconds_count{{{CAP}}}[{RI}]))",
                "{{capability}}",
            )
        ],
    ),
    Panel(
        "Task duration p95, by executor",
        "How long agents ran tasks of the chosen capabilities, 95th percentile per executor.",
        "s",
        [
            (
                "histogram_quantile(0.95, sum by (executor, le) "
                f"(rate(orch_task_duration_seconds_bucket{{{CAP}}}[{RI}])))",
                "{{executor}}",
            )
        ],
    ),
    Panel(
        "Outcomes",
        "Tasks of the chosen capabilities finishing per second, by outcome.",
        "ops",
        [(f"sum by (outcome) (rate(orch_tasks_finished_total{{{CAP}}}[{RI}]))", "{{outcome}}")],
    ),
    Panel(
        "Failures, by capability and cause",
        "Failed tasks per second, by capability and whose doing the failure was.",
        "ops",
        [
            (
                f'sum by (capability, cause) (rate(orch_tasks_finished_total{{{CAP}, outcome="failed"}}[{RI}]))',
                "{{capability}} {{cause}}",
            )
        ],
    ),
]

FLEET = [
    Panel(
        "Agents up",
        "Agents online or busy.",
        "short",
        [("count(max by (agent) (orch_agent_up) == 1) or vector(0)", "up")],
        "stat",
        6,
    ),
    Panel(
        "Circuit breakers open",
        "External (EAP push) agents whose circuit breaker is open: their status is degraded.",
        "short",
        [('count(orch_agent_status{status="degraded"} == 1) or vector(0)', "open")],
        "stat",
        6,
    ),
    Panel(
        "Agents by status",
        "How many agents are online, busy, draining, offline or degraded.",
        "short",
        [("sum by (status) (max by (agent, status) (orch_agent_status))", "{{status}}")],
    ),
    Panel(
        "Heartbeat age",
        "Seconds since each agent's last heartbeat; AgentHeartbeatStale fires past 60 s while it counts as up.",
        "s",
        [("time() - max by (agent) (orch_agent_last_heartbeat_timestamp_seconds)", "{{agent}}")],
    ),
    Panel(
        "Heartbeats received",
        "Heartbeats recorded per second, by agent.",
        "ops",
        [(f"sum by (agent) (rate(orch_agent_heartbeats_total[{RI}]))", "{{agent}}")],
    ),
    Panel(
        "Load",
        "Tasks each agent runs now, as a share of the tasks it may run at once.",
        "percentunit",
        [("max by (agent) (orch_agent_load) / max by (agent) (orch_agent_concurrency)", "{{agent}}")],
    ),
    Panel(
        "Breaker open, by agent",
        "1 while an external agent's circuit breaker is open (status degraded).",
        "short",
        [('max by (agent) (orch_agent_status{status="degraded"})', "{{agent}}")],
    ),
    Panel(
        "Live agents per capability",
        "Agents online or busy that offer each capability.",
        "short",
        [(f"max by (capability) (orch_capability_agents_online{{{CAP}}})", "{{capability}}")],
    ),
    Panel(
        "Sandbox refusals",
        "Agent processes the sandbox refused to start, by reason.",
        "short",
        [(f"sum by (reason) (increase(orch_sandbox_refusals_total[{RI}]))", "{{reason}}")],
    ),
]

LOCKS_SWEEPS = [
    Panel(
        "Lock wait p99",
        "The 99th percentile of the time spent waiting for each lock; LockWaitHigh fires past 5 s for 10 minutes.",
        "s",
        [(f"histogram_quantile(0.99, sum by (lock, le) (rate(orch_lock_wait_seconds_bucket[{RI}])))", "{{lock}}")],
    ),
    Panel(
        "Lock acquisitions",
        "Lock acquisitions (or attempts) per second, by lock.",
        "ops",
        [(f"sum by (lock) (rate(orch_lock_wait_seconds_count[{RI}]))", "{{lock}}")],
    ),
    Panel(
        "Lock acquisitions given up",
        "Acquisitions that gave up per second, by lock and reason (timeout, deadlock).",
        "ops",
        [(f"sum by (lock, reason) (rate(orch_lock_acquire_failures_total[{RI}]))", "{{lock}} {{reason}}")],
    ),
    Panel(
        "Fencing rejections",
        "Writes refused because a newer attempt or lock holder had taken over, by resource and operation.",
        "short",
        [
            (
                f"sum by (resource, operation) (increase(orch_fencing_rejections_total[{RI}]))",
                "{{resource}} {{operation}}",
            )
        ],
    ),
    Panel(
        "Time since each sweep last succeeded",
        "Seconds since each of Beat's sweeps last finished without an error.",
        "s",
        [("time() - max by (sweep) (orch_sweep_last_success_timestamp_seconds)", "{{sweep}}")],
    ),
    Panel(
        "Sweep lag in periods",
        "Time since each sweep's last success over its period; SweepStalled fires above 3.",
        "short",
        [
            (
                "(time() - max by (sweep) (orch_sweep_last_success_timestamp_seconds))\n"
                "/ max by (sweep) (orch_sweep_period_seconds)",
                "{{sweep}}",
            )
        ],
    ),
    Panel(
        "Sweep repairs",
        "What the sweeps repaired, by kind: expired leases, lost messages, silent agents, stuck sessions.",
        "short",
        [(f"sum by (kind) (increase(orch_sweep_repairs_total[{RI}]))", "{{kind}}")],
    ),
]

DASHBOARDS = [
    ("orch-overview", "Orchestrator: overview", "Sessions, throughput, errors and SLO budgets.", OVERVIEW, False),
    ("orch-task-flow", "Orchestrator: task flow", "Latency, backlog and outcomes per capability.", TASK_FLOW, True),
    ("orch-fleet", "Orchestrator: fleet", "Agents, heartbeats, load and circuit breakers.", FLEET, True),
    (
        "orch-locks-sweeps",
        "Orchestrator: locks and sweeps",
        "Lock waits, fencing and Beat's sweeps.",
        LOCKS_SWEEPS,
        False,
    ),
]


def _variables(with_capability: bool) -> list[dict]:
    variables = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
            "refresh": 1,
            "regex": "",
            "options": [],
        }
    ]
    if with_capability:
        query = "label_values(orch_queue_depth, capability)"
        variables.append(
            {
                "name": "capability",
                "label": "Capability",
                "type": "query",
                "datasource": DATASOURCE,
                "query": {"query": query, "refId": "capability"},
                "definition": query,
                "refresh": 2,
                "multi": True,
                "includeAll": True,
                "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "sort": 1,
                "hide": 0,
                "options": [],
            }
        )
    return variables


def _panels(panels: list[Panel]) -> list[dict]:
    out, x, y, row_height = [], 0, 0, 0
    for number, panel in enumerate(panels, start=1):
        height = 4 if panel.kind == "stat" else 8
        if x + panel.width > 24:
            x, y, row_height = 0, y + row_height, 0
        out.append(
            {
                "id": number,
                "type": panel.kind,
                "title": panel.title,
                "description": panel.description,
                "datasource": DATASOURCE,
                "gridPos": {"h": height, "w": panel.width, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
                if panel.kind == "timeseries"
                else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
                "targets": [
                    {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(panel.targets)
                ],
            }
        )
        x, row_height = x + panel.width, max(row_height, height)
    return out


def dashboard(uid: str, title: str, description: str, panels: list[Panel], with_capability: bool) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["orchestrator"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "links": [{"type": "dashboards", "tags": ["orchestrator"], "asDropdown": True, "title": "Orchestrator"}],
        "templating": {"list": _variables(with_capability)},
        "panels": _panels(panels),
    }


def render() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {f"{uid}.json": json.dumps(dashboard(uid, *rest), indent=2) + "\n" for uid, *rest in DASHBOARDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a dashboard file is not what it would write")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = OUT / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}: run python -m deploy.generate_dashboards", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
