"""The alert rules generated from deploy/slo.yaml: committed as generated, valid for promtool, each
alert proven by a promtool unit test that makes it fire and one that keeps it silent, and each
pointing at a runbook and a dashboard that exist. promtool comes with the Debian package
prometheus, which `make test` installs (scripts/ensure_services.py)."""

import json
import re
import shutil
import subprocess

import pytest
import yaml

from deploy import generate_rules
from tests.conftest import ROOT

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules" / "slo.rules.yml"
UNIT_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks"
DASHBOARDS = ROOT / "deploy" / "grafana" / "dashboards"
SECTIONS = ("Meaning", "Impact", "Diagnosis", "Mitigation", "Escalation")
# `tests/reliability/test_beat.py::test_two_beats_...` in a runbook: a test that rehearses it.
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        pytest.fail(
            "promtool is not installed: `make test-services` installs it (the Debian package prometheus, "
            "through scripts/ensure_services.py), or: sudo apt-get install -y prometheus"
        )
    return path


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alert_ids() -> list[str]:
    return [rule["alert"] for rule in alerts()]


def test_the_committed_rules_are_what_the_generator_writes():
    assert RULES.read_text() == generate_rules.render(), "run: python -m deploy.generate_rules"


def test_the_generator_puts_a_given_runbook_base_url_in_front_of_every_runbook():
    text = generate_rules.render(runbook_base_url="https://example.org/runbooks/")
    urls = [
        rule["annotations"]["runbook_url"]
        for group in yaml.safe_load(text)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert urls
    assert all(url.startswith("https://example.org/runbooks/") for url in urls)


def test_there_are_the_burn_rate_alerts_of_every_slo_and_the_cause_alerts():
    config = yaml.safe_load((ROOT / "deploy" / "slo.yaml").read_text())
    expected = {f"{slo['alert']}BudgetBurn{severity}" for slo in config["slos"] for severity in ("Page", "Ticket")}
    expected |= {cause["alert"] for cause in config["cause_alerts"]}
    assert sorted(alert_ids()) == sorted(expected)
    assert len(config["slos"]) >= 3


def test_promtool_accepts_the_rules(promtool):
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_rules_pass(promtool):
    assert UNIT_TESTS
    result = run(promtool, "test", "rules", *map(str, UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_fails_a_unit_test_that_expects_the_wrong_alert(promtool, tmp_path):
    # Guards the test above: a broken expectation must make promtool exit non-zero.
    (tmp_path / "wrong.yml").write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(RULES)],
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [{"series": 'up{job="web", instance="a"}', "values": "1x10"}],
                        "alert_rule_test": [
                            {"eval_time": "10m", "alertname": "MetricsTargetDown", "exp_alerts": [{"exp_labels": {}}]}
                        ],
                    }
                ],
            }
        )
    )
    assert run(promtool, "test", "rules", str(tmp_path / "wrong.yml")).returncode != 0


def unit_test_expectations() -> dict[str, set[str]]:
    """For each alert name, which kinds of expectation the unit tests hold: 'fires', 'silent'."""
    seen: dict[str, set[str]] = {}
    for path in UNIT_TESTS:
        document = yaml.safe_load(path.read_text())
        assert [(path.parent / f).resolve() for f in document["rule_files"]] == [RULES.resolve()], path
        for case in document["tests"]:
            for expectation in case.get("alert_rule_test", []):
                kind = "fires" if expectation.get("exp_alerts") else "silent"
                seen.setdefault(expectation["alertname"], set()).add(kind)
    return seen


@pytest.mark.parametrize("alert", alert_ids())
def test_every_alert_has_a_unit_test_where_it_fires_and_one_where_it_stays_silent(alert):
    assert unit_test_expectations().get(alert) == {"fires", "silent"}


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_every_alert_has_a_severity_a_summary_a_runbook_and_a_dashboard(rule):
    assert rule["labels"]["severity"] in ("page", "ticket")
    assert set(rule["annotations"]) >= {"summary", "runbook_url", "dashboard_url"}
    assert all(rule["annotations"][key].strip() for key in ("summary", "runbook_url", "dashboard_url"))


def dashboard_uids() -> set[str]:
    return {json.loads(path.read_text())["uid"] for path in DASHBOARDS.glob("*.json")}


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_every_runbook_url_is_a_runbook_with_the_five_sections(rule):
    config = yaml.safe_load((ROOT / "deploy" / "slo.yaml").read_text())
    url = rule["annotations"]["runbook_url"]
    assert url == f"{config['runbook_base_url']}{rule['alert']}.md"
    runbook = ROOT / url
    assert runbook.is_file(), f"{url} does not exist"
    headings = re.findall(r"^## (\w+)", runbook.read_text(), flags=re.MULTILINE)
    assert [h for h in headings if h in SECTIONS] == list(SECTIONS), f"{url}: sections {headings}"


@pytest.mark.parametrize("rule", alerts(), ids=lambda rule: rule["alert"])
def test_every_dashboard_url_names_a_provisioned_dashboard(rule):
    match = re.fullmatch(r".*/d/([\w-]+)", rule["annotations"]["dashboard_url"])
    assert match, rule["annotations"]["dashboard_url"]
    assert match.group(1) in dashboard_uids()


def runbook_documents() -> list:
    return [*sorted(RUNBOOKS.glob("*.md")), ROOT / "deploy" / "README.md"]


@pytest.mark.parametrize("doc", runbook_documents(), ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_test_a_runbook_names_exists(doc):
    for path, name in TEST_REFERENCE.findall(doc.read_text()):
        source = ROOT / path
        assert source.is_file(), f"{path} does not exist"
        assert re.search(rf"^def {name}\(", source.read_text(), flags=re.MULTILINE), f"{path} has no {name}"


@pytest.mark.parametrize("doc", runbook_documents(), ids=lambda doc: str(doc.relative_to(ROOT)))
def test_relative_links_of_runbooks_resolve(doc):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if "://" not in target:
            assert (doc.parent / target).resolve().exists(), f"{target} does not exist"


def test_the_runbooks_index_lists_every_runbook():
    index = (RUNBOOKS / "README.md").read_text()
    missing = [p.name for p in RUNBOOKS.glob("*.md") if p.name != "README.md" and f"({p.name})" not in index]
    assert missing == []


def test_the_scrape_config_is_valid(promtool, tmp_path):
    # The config reads the token from a file run.sh writes; give the copy one.
    copy = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS, copy, ignore=shutil.ignore_patterns("data", "metrics_token"))
    (copy / "metrics_token").write_text("")
    result = run(promtool, "check", "config", str(copy / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]}
    assert {"web", "orchestrator"} <= jobs  # MetricsTargetDown watches these two by name
