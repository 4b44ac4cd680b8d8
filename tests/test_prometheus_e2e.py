"""A real Prometheus (Debian's package) scraping a real stack: the web under gunicorn, the
orchestrator worker, two agents and Beat, with our rules, at a 1 s scrape and evaluation interval
and with every alert's `for` shortened to FOR (promtool's unit tests, tests/test_alert_rules.py,
hold the shipped `for` windows; here each would only add its minute of waiting).

Every dashboard query returns data once sessions have run; the no-live-agent alert fires while a
capability's tasks wait with its only agent stopped, and clears when the agent returns; the
stalled-sweep alert fires once Beat stops.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from django.apps import apps

from orchestrator_project.schedules import sync_schedules

from .conftest import ALL_BUILD, ALL_QA, ROOT, dag_payload, free_port, member_token, running_stack, wait_until

pytestmark = [pytest.mark.e2e]

DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
RULES = ROOT / "deploy" / "prometheus" / "rules"
TOKEN = "prometheus-e2e-scrape-token"
FOR = "5s"


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def ready(self) -> bool:
        """Prometheus answers 503 until it has loaded its storage and rules."""
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def alerts(self, name: str, state: str = "firing") -> list[dict]:
        answer = httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()
        return [a for a in answer["data"]["alerts"] if a["labels"]["alertname"] == name and a["state"] == state]


def write_config(directory: Path, targets: dict[str, int]) -> Path:
    """Our rules (alerts' `for` shortened), every process of the stack as a job, 1 s intervals
    (the shipped config's 15 s would make the test wait minutes for a rate)."""
    (directory / "token").write_text(TOKEN)
    jobs = [
        {
            "job_name": "web",
            "metrics_path": "/metrics",
            "authorization": {"type": "Bearer", "credentials_file": str(directory / "token")},
            "static_configs": [{"targets": [f"127.0.0.1:{targets.pop('web')}"]}],
        },
        *({"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]} for job, port in targets.items()),
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(path) for path in shortened_rules(directory)],
        "scrape_configs": jobs,
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def shortened_rules(directory: Path) -> list[Path]:
    """Copies of our rule files in `directory`, each alert's `for` set to FOR; the rest as shipped."""
    copies = []
    for shipped in sorted(RULES.glob("*.yml")):
        rules = yaml.safe_load(shipped.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = FOR
        copy = directory / shipped.name
        copy.write_text(yaml.safe_dump(rules, sort_keys=False))
        copies.append(copy)
    assert copies, f"no rule files in {RULES}"
    return copies


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel of every dashboard, its variables given values: every
    capability, and a rate window that spans a few scrapes."""
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    expr = target["expr"].replace("$__rate_interval", "1m")
                    expr = re.sub(r"\$\{?capability\}?", ".*", expr)
                    assert "$" not in expr, f"{path.name}: a variable the test does not know in {expr}"
                    queries.append((f"{path.stem}: {panel['title']}", expr))
    assert len(queries) >= 20
    return queries


def api(web: str, token: str):
    return httpx.Client(base_url=web, headers={"Authorization": f"Token {token}"}, timeout=30)


def run_session(client: httpx.Client, payload: dict) -> str:
    created = client.post("/api/v1/sessions/", json=payload)
    assert created.status_code == 201, created.text
    session_id = created.json()["id"]
    assert client.post(f"/api/v1/sessions/{session_id}/start/").status_code == 202
    return session_id


def status_of(client: httpx.Client, session_id: str) -> str:
    return client.get(f"/api/v1/sessions/{session_id}/").json()["status"]


def test_prometheus_sees_the_stack_and_its_alerts_fire_and_clear(request, transactional_db, tmp_path):
    assert shutil.which("prometheus"), "Prometheus is missing: make test installs it (scripts/ensure_services.py)"
    sync_schedules(apps)  # Beat's sweeps: a test before this one may have flushed what the migrations wrote
    ports = {job: free_port() for job in ("web", "orchestrator", "builder", "reviewer", "prometheus")}
    orchestrator_env = {"METRICS_PORT": str(ports["orchestrator"])}
    with running_stack(request, env={"METRICS_TOKEN": TOKEN}, orchestrator_env=orchestrator_env) as stack:
        stack.agent("builder", ALL_BUILD, env={"METRICS_PORT": str(ports["builder"])})
        stack.agent("reviewer", ALL_QA, env={"METRICS_PORT": str(ports["reviewer"])})
        stack.beat("beat")
        stack._spawn(
            "web",
            [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "orchestrator_project.wsgi",
             "--bind", f"127.0.0.1:{ports['web']}", "--workers", "2", "--threads", "2", "--no-control-socket"],
        )  # fmt: skip
        config = write_config(tmp_path, {job: port for job, port in ports.items() if job != "prometheus"})
        stack._spawn(
            "prometheus",
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{ports['prometheus']}"],
        )  # fmt: skip
        prometheus = Prometheus(f"http://127.0.0.1:{ports['prometheus']}")
        wait_until(prometheus.ready, timeout=60, what="Prometheus to be ready")
        wait_until(lambda: len(prometheus_up(prometheus)) == 4, timeout=60, what="Prometheus to scrape every job")

        client = api(f"http://127.0.0.1:{ports['web']}", member_token("acme", "alice"))
        sessions = [run_session(client, dag_payload()) for _ in range(3)]
        failing = dag_payload(title="fails", tasks=[{"key": "f", "title": "F", "capability": "code_generation",
                                                     "params": {"fail_rate": 1}}])  # fmt: skip
        sessions.append(run_session(client, failing))
        for session_id in sessions:
            wait_until(lambda s=session_id: status_of(client, s) in ("completed", "failed"), what="a session to settle")

        for title, expr in dashboard_queries():
            wait_until(lambda e=expr: prometheus.query(e), timeout=60, what=f"data for '{title}': {expr}")

        # The reviewer (the only agent offering testing) stops, Beat stops; a testing task waits.
        stack.stop_one("reviewer")
        stack.stop_one("beat")
        waiting = run_session(
            client, dag_payload(title="waits", tasks=[{"key": "t", "title": "T", "capability": "testing"}])
        )
        backlog = "CapabilityBacklogWithoutAgents"
        wait_until(
            lambda: [a for a in prometheus.alerts(backlog) if a["labels"].get("capability") == "testing"],
            timeout=180,
            what=f"{backlog} firing for testing",
        )
        wait_until(lambda: prometheus.alerts("SweepStalled"), timeout=180, what="SweepStalled firing")

        stack.agent("reviewer", ALL_QA, env={"METRICS_PORT": str(ports["reviewer"])})
        wait_until(lambda: status_of(client, waiting) == "completed", what="the waiting session to complete")
        wait_until(
            lambda: (
                not prometheus.alerts("CapabilityBacklogWithoutAgents", state="firing")
                and not prometheus.alerts("CapabilityBacklogWithoutAgents", state="pending")
            ),
            timeout=60,
            what="CapabilityBacklogWithoutAgents to clear",
        )


def prometheus_up(prometheus: Prometheus) -> list[dict]:
    try:
        return [
            r
            for r in prometheus.query("up == 1")
            if r["metric"]["job"] in ("web", "orchestrator", "builder", "reviewer")
        ]
    except httpx.HTTPError:
        return []


@pytest.mark.parametrize("config", ["prometheus.yml", "compose.yml"])
def test_the_shipped_configs_check_and_scrape_the_same_jobs(tmp_path, config):
    # What `make up` and docker-compose run: promtool reads each and the rule files it names (a
    # copy, with the token file their start-up writes).
    shipped = shutil.copytree(ROOT / "deploy" / "prometheus", tmp_path / "prometheus")
    token = shipped / "metrics_token"
    token.write_text(TOKEN)
    text = (shipped / config).read_text().replace("/prometheus/metrics_token", str(token))
    (shipped / config).write_text(text)
    checked = subprocess.run(
        ["promtool", "check", "config", str(shipped / config)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    jobs = [job["job_name"] for job in yaml.safe_load(text)["scrape_configs"]]
    assert jobs == ["web", "orchestrator", "builder", "reviewer", "eap-gateway"]
