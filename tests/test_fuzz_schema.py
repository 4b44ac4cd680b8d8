"""The API fuzzed from its own OpenAPI schema: schemathesis reads /api/schema/ from a live server
and sends every operation valid and invalid data (its examples, coverage and fuzzing phases, in
positive and negative mode) with a developer's token. No answer may be a 5xx, and every answer
must be one the schema describes: its status code, content type and body.

Bounded and reproducible for CI: a fixed number of examples per operation and a fixed seed, so
that a failure found in CI is found again by the same command on a laptop:

    pytest tests/test_fuzz_schema.py -m fuzz

The event streams (/api/v1/stream/, /api/v1/sessions/{id}/stream/) are served by the ASGI
process and are left out of the schema (api/stream.py), so schemathesis never sees them.

Mutating operations run for real against the test database: sessions are created, started,
paused and cancelled. Starting one publishes its canvas to the test Redis database, where the
messages wait (no worker runs here); a drain or resume broadcasts a control message nobody
answers, which Celery does not wait for."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from agents.models import Agent
from sessions.models import Checkpoint
from tasks.models import Task
from tenants.models import Membership

from .conftest import ROOT, create_and_start, dag_payload, member_client, member_token

# Examples per operation for the fuzzing phase (the examples and coverage phases add their own,
# bounded by the schema): about 3,200 cases over 29 operations, under two minutes on 2 cores.
EXAMPLES_PER_OPERATION = 25
SEED = 16  # every operation's cases derive from it: CI sends the same cases every run
# Two schemathesis processes side by side, each on a part of the operations (the live server
# answers each request in a thread of its own): about half the time of one on 2 cores. Processes,
# not schemathesis's --workers threads: on Python 3.11 its threads compiling at once crash the
# interpreter's parser ("AST constructor recursion depth mismatch"). Each operation's cases stay
# the same; only which operations overlap varies.
SESSIONS = "^/api/v1/sessions/"
PARTS = {"sessions": ["--include-path-regex", SESSIONS], "others": ["--exclude-path-regex", SESSIONS]}
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"

pytestmark = pytest.mark.fuzz


@pytest.fixture
def developer_token(transactional_db) -> str:
    """The developer's API token every request carries: the one place this test makes one."""
    return member_token("fuzz", "dev")


@pytest.fixture
def known_ids(transactional_db, developer_token) -> dict[str, list[str]]:
    """Objects the fuzzer's paths can name, by collection: a session never started (its tasks
    unclaimed, one with a checkpoint), one started (a task claimed by an agent), and an external
    agent an operator registered, whose token the EAP operations carry."""
    developer = APIClient()
    developer.credentials(HTTP_AUTHORIZATION=f"Token {developer_token}")
    pending = developer.post("/api/v1/sessions/", dag_payload(), format="json").json()["id"]
    started = create_and_start(developer, dag_payload(title="Started"))
    operator = member_client("fuzz", "ops", role=Membership.Role.OPERATOR)
    registered = operator.post(
        "/api/v1/eap/register/", {"name": "fuzz-ext", "capabilities": ["documentation"], "mode": "pull"}, format="json"
    ).json()
    agent = Agent.objects.get(pk=registered["agent_id"])
    claimed = Task.objects.filter(session_id=started).order_by("key").first()
    Task.objects.filter(pk=claimed.pk).update(agent=agent, status=Task.Status.RUNNING)
    checkpointed = Task.objects.filter(session_id=pending).order_by("key").first()
    Checkpoint.objects.create(session_id=pending, task=checkpointed)
    return {
        "sessions": [str(pending), str(started)],
        "tasks": [str(checkpointed.pk), str(claimed.pk)],
        "agents": [str(agent.pk)],
        "agent_token": registered["token"],
    }


def schemathesis_command(base_url: str, headers: dict[str, str], workdir: Path, part: list[str]) -> list[str]:
    """schemathesis's own command line (`schemathesis run`) against the live server, for the
    operations `part` selects. Its command line rather than its pytest plugin: the plugin's lazy
    schema (needed for a live server's URL) reads a pytest internal that pytest 9.2 removed.
    No cache: a run replays no crash an earlier run stored, so every run sends the same cases."""
    workdir.mkdir()
    config = workdir / "schemathesis.toml"
    config.write_text("[cache]\nenabled = false\n")
    report = str(workdir / "junit.xml")
    return [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
            f"{base_url}/api/schema/?format=json", *part,
            "--url", base_url, "--checks", CHECKS, "--mode", "all", "--phases", "examples,coverage,fuzzing",
            "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", str(SEED),
            "--generation-with-security-parameters", "false", "--generation-database", "none",
            "--continue-on-failure", "--report", "junit", "--report-junit-path", report, "--no-color",
            *(option for name, value in headers.items() for option in ("--header", f"{name}: {value}"))]  # fmt: skip


def test_every_operation_answers_as_its_schema_says(live_server, developer_token, known_ids, tmp_path):
    headers = {"Authorization": f"Token {developer_token}", "X-Agent-Token": known_ids["agent_token"]}
    # The hooks in tests/fuzz_hooks.py fill the paths with the known objects' ids.
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks", "FUZZ_KNOWN_IDS": json.dumps(known_ids)}
    output = {"cwd": ROOT, "env": env, "stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    runs = {
        name: subprocess.Popen(schemathesis_command(live_server.url, headers, tmp_path / name, part), **output)
        for name, part in PARTS.items()
    }
    try:
        outputs = {name: run.communicate(timeout=600)[0] for name, run in runs.items()}
    finally:
        for run in runs.values():
            run.kill()

    for name, output in outputs.items():
        # Phases, warnings and how many cases ran (pytest -s shows them).
        print(f"--- {name} ---", output[output.rfind("SUMMARY") :], sep="\n")
    failed = {name: outputs[name][-30000:] for name, run in runs.items() if run.returncode != 0}
    assert not failed, f"schemathesis found failures in {sorted(failed)}:\n" + "\n".join(failed.values())
