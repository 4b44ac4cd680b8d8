"""A lint of the Grafana dashboards in deploy/grafana/, after grafana/dashboard-linter's rules
(a templated Prometheus datasource that every panel and query reads, a title, a description and
a unit on every panel, `$__rate_interval` in every rate), plus: every query parses (promtool),
and every metric a query or an alert rule reads is one we export or one our rules record.

What we export is derived from the code: the families registered in prometheus_client's registry
once orchestrator_project.metrics and django-prometheus's middleware metrics are loaded, and the
families the web's DatabaseCollector (api/metrics.py) yields at scrape time."""

import json
import re
import shutil
import subprocess

import pytest
import yaml
from django_prometheus.middleware import Metrics
from prometheus_client import REGISTRY

from api.metrics import DatabaseCollector
from deploy import generate_dashboards
from tests.conftest import ROOT

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "rules" / "slo.rules.yml"
# Grafana's own variables; any other $name must be a template variable of the dashboard.
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}
# Series Prometheus makes itself, not any exporter.
PROMETHEUS_SERIES = {"up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"}
PROMQL_WORDS |= {"offset", "inf", "nan", "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk"}
PROMQL_WORDS |= {"bottomk", "quantile", "count_values"}  # aggregations: `sum by (x) (...)` puts no ( after sum
RATE = re.compile(r"\b(rate|irate|increase)\s*\(")


def load(path) -> dict:
    return json.loads(path.read_text())


def panels() -> list[tuple[str, dict]]:
    return [(path.stem, panel) for path in DASHBOARD_FILES for panel in load(path)["panels"]]


def panel_id(item) -> str:
    return f"{item[0]}:{item[1].get('title', item[1].get('id'))}"


def exprs() -> list[tuple[str, str]]:
    return [(panel_id(item), target["expr"]) for item in panels() for target in item[1]["targets"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (no full parser: strings, label matchers,
    ranges and grouping lists are removed first, then what is left and no function is a name)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r" \1 ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", text):
        following = text[match.end() :].lstrip()
        if not following.startswith("(") and match.group().lower() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def test_the_metric_name_extraction_sees_names_and_nothing_else():
    expr = (
        'histogram_quantile(0.99, sum by (lock, le) (rate(orch_lock_wait_seconds_bucket{lock=~"a|b"}[5m])))'
        " / on (lock) group_left slo:error_budget:ratio offset 1h > 1e3 or vector(0)"
        " unless max by (sweep) (last_over_time(orch_x[4h:15s]))"
    )
    assert metric_names(expr) == {"orch_lock_wait_seconds_bucket", "slo:error_budget:ratio", "orch_x"}


def sample_names(name: str, kind: str) -> set[str]:
    """The series names a family of this type is exposed as (prometheus_client's suffixes)."""
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_count", "_sum"],
        "summary": ["", "_count", "_sum"],
        "info": ["_info"],
    }.get(kind, [""])
    return {name + suffix for suffix in suffixes}


@pytest.fixture
def exported(db) -> set[str]:
    Metrics.get_instance()  # django-prometheus registers its middleware's metrics on first use
    names = set()
    for family in [*REGISTRY.collect(), *DatabaseCollector().collect()]:
        names |= sample_names(family.name, family.type)
    return names


def recorded() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["record"] for group in groups for rule in group["rules"] if "record" in rule}


def test_the_exported_names_include_the_process_the_database_and_the_http_metrics(exported):
    # Guards the derivation: one of each source, with the suffix its type gets.
    assert {
        "orch_tasks_finished_total",
        "orch_task_schedule_to_start_seconds_bucket",
        "orch_sweep_period_seconds",
        "django_http_responses_total_by_status_view_method_total",
    } <= exported
    assert "orch_tasks_finished" not in exported


def test_the_committed_dashboards_are_what_the_generator_writes():
    rendered = generate_dashboards.render()
    assert sorted(rendered) == [path.name for path in DASHBOARD_FILES]
    for path in DASHBOARD_FILES:
        assert path.read_text() == rendered[path.name], "run: python -m deploy.generate_dashboards"


def test_there_are_the_four_dashboards_each_with_a_unique_uid():
    uids = [load(path)["uid"] for path in DASHBOARD_FILES]
    assert sorted(uids) == ["orch-fleet", "orch-locks-sweeps", "orch-overview", "orch-task-flow"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.stem)
def test_the_datasource_is_a_template_variable_of_type_prometheus(path):
    variables = {v["name"]: v for v in load(path)["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda path: path.stem)
def test_every_variable_a_query_uses_is_defined(path):
    dashboard = load(path)
    defined = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_VARIABLES
    used = {
        name for panel in dashboard["panels"] for t in panel["targets"] for name in re.findall(r"\$(\w+)", t["expr"])
    }
    assert used <= defined


def test_the_task_flow_dashboard_filters_by_capability():
    dashboard = load(GRAFANA / "dashboards" / "orch-task-flow.json")
    assert "capability" in {v["name"] for v in dashboard["templating"]["list"]}
    assert all('capability=~"$capability"' in t["expr"] for panel in dashboard["panels"] for t in panel["targets"])


@pytest.mark.parametrize("item", panels(), ids=panel_id)
def test_every_panel_has_a_title_a_description_a_unit_and_reads_the_datasource_variable(item):
    _, panel = item
    assert panel.get("title", "").strip()
    assert panel.get("description", "").strip()
    assert panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "").strip()
    assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert panel["targets"]
    for target in panel["targets"]:
        assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def rate_windows(expr: str) -> list[str]:
    """The range of every rate(), irate() and increase() call in `expr`."""
    windows = []
    for match in RATE.finditer(expr):
        depth, end = 1, match.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(expr[end], 0)
            end += 1
        windows += re.findall(r"\[([^\]]*)\]", expr[match.end() : end]) or ["(no range)"]
    return windows


def test_the_rate_window_check_sees_every_window():
    expr = 'sum(rate(a[5m])) / sum(increase(b{c="d"}[$__rate_interval])) + irate(x[1m])'
    assert rate_windows(expr) == ["5m", "$__rate_interval", "1m"]


@pytest.mark.parametrize(("panel", "expr"), exprs(), ids=[panel for panel, _ in exprs()])
def test_every_rate_uses_the_rate_interval(panel, expr):
    assert all(window == "$__rate_interval" for window in rate_windows(expr)), expr


def as_promql(expr: str) -> str:
    """A dashboard query as Prometheus would get it, with Grafana's variables filled in."""
    return expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$capability", ".*")


def test_every_query_parses(tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.fail("promtool is not installed: `make test-services` installs it (Debian package prometheus)")
    rules = [{"record": f"lint:query_{n}", "expr": as_promql(expr)} for n, (_, expr) in enumerate(exprs())]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout


@pytest.mark.django_db
def test_every_metric_a_dashboard_reads_is_exported_or_recorded(exported):
    known = exported | recorded()
    unknown = {f"{panel}: {name}" for panel, expr in exprs() for name in metric_names(as_promql(expr)) - known}
    assert unknown == set()


@pytest.mark.django_db
def test_every_metric_an_alert_rule_reads_is_exported_or_recorded(exported):
    groups = yaml.safe_load(RULES.read_text())["groups"]
    known = exported | recorded() | PROMETHEUS_SERIES
    used = {name for group in groups for rule in group["rules"] for name in metric_names(rule["expr"])}
    assert used
    assert used - known == set()


def test_the_provisioning_points_grafana_at_prometheus_and_the_dashboards():
    provisioning = GRAFANA / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [source["type"] for source in datasources] == ["prometheus"]
    providers = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())["providers"]
    assert [provider["type"] for provider in providers] == ["file"]
    assert providers[0]["options"]["path"]
