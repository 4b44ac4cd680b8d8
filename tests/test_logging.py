"""Structured logs (docs/LOGGING.md): the format LOG_FORMAT picks, the redaction of our secrets,
the context bound to requests and Celery tasks, and a full run of real workers whose every line
is JSON, carries its session, task, agent and tenant, and holds none of the environment's secrets."""

import json
import logging
import re
import secrets
import subprocess
import sys
from urllib.parse import quote

import pytest
import structlog
from celery.signals import task_prerun
from django.conf import settings
from opentelemetry import trace

from orchestrator_project import logs, redaction
from sessions.models import SessionEvent

from .conftest import ROOT, Stack, create_and_start, dag_payload, member_client, running_stack, wait_for_status

# --- redaction -------------------------------------------------------------------------------


def render(event: str, log_format: str = "json", secrets_: tuple[str, ...] = (), **fields) -> str:
    """A line as the configured formatter renders a standard library record with `fields`."""
    config = logs.logging_config(log_format=log_format, level="INFO", secrets=secrets_)
    spec = dict(config["formatters"]["structured"])
    formatter = spec.pop("()")(**spec)
    record = logging.LogRecord("tests.logging", logging.WARNING, __file__, 1, event, (), None)
    return formatter.format(record)


def test_a_secret_is_redacted_as_given_percent_encoded_and_json_escaped():
    # In a JSON line the quote and the backslash arrive escaped: only the escaped form is there.
    secret = 'p@ss"word/with\\odd'
    line = render(f"plain {secret} url postgres://u:{quote(secret, safe='')}@db/x", secrets_=(secret,))

    assert json.loads(line)["event"] == "plain [redacted] url postgres://u:[redacted]@db/x"
    assert "p@ss" not in line and "p%40ss" not in line


def test_a_secret_containing_another_is_redacted_whole():
    line = render("token abcdefgh-ijklmnop", secrets_=("abcdefgh", "abcdefgh-ijklmnop"))

    assert json.loads(line)["event"] == "token [redacted]"


def test_an_external_agents_token_keeps_only_its_public_prefix():
    token = f"eap_0123456789ab_{secrets.token_urlsafe(32)}"

    line = render(f"Authorization: Bearer {token}")

    assert json.loads(line)["event"] == "Authorization: Bearer eap_0123456789ab_[redacted]"


def test_the_console_format_is_redacted_too():
    line = render("key sk-live-abcdef123456", log_format="console", secrets_=("sk-live-abcdef123456",))

    assert "sk-live-abcdef123456" not in line and "key [redacted]" in line


def test_secret_values_are_read_from_the_environment():
    environ = {
        "SECRET_KEY": "django-secret-key-1",
        "OPENAI_API_KEY": "sk-openai-123456",
        "METRICS_TOKEN": "metrics-token-123",
        "GITHUB_TOKEN": "ghp_abcdefghijkl",
        "OPENCODE_SERVER_PASSWORD": "opencode-pw-1",
        "FLOWER_BASIC_AUTH": "admin:flower-pw-123",
        "DATABASE_URL": "postgres://app:db%40pass-123@db:5432/orchestrator",
        "CELERY_BROKER_URL": "amqp://guest:broker-pw-123@mq//",
        "REDIS_URL": "redis://127.0.0.1:6379/0",  # no password: nothing to hide
        "WORKSPACE_ROOT": "/var/lib/orchestrator/workspaces",
        "SHORT_TOKEN": "abc",  # too short to redact without mangling every line
    }

    found = redaction.secret_values(environ, also=["from-settings-1"])

    assert found == {
        "django-secret-key-1",
        "sk-openai-123456",
        "metrics-token-123",
        "ghp_abcdefghijkl",
        "opencode-pw-1",
        "admin:flower-pw-123",
        "flower-pw-123",
        "db%40pass-123",
        "db@pass-123",
        "broker-pw-123",
        "from-settings-1",
    }


# --- format ----------------------------------------------------------------------------------


def log_one_line(env: dict) -> subprocess.CompletedProcess:
    """A process that sets Django up with `env` and logs one line, as every process does."""
    code = "import django, logging; django.setup(); logging.getLogger('probe').warning('probe line %s', 42)"
    base = {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "orchestrator_project.settings",
            "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/unused", "SECRET_KEY": "format-test-key"}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DEBUG": "false"}, "json"),
        ({"DEBUG": "true"}, "console"),
        ({"DEBUG": "true", "LOG_FORMAT": "json"}, "json"),
        ({"DEBUG": "false", "LOG_FORMAT": "console"}, "console"),
    ],
)
def test_log_format_defaults_to_json_unless_debug_and_can_be_chosen(env, expected):
    done = log_one_line(env)

    assert done.returncode == 0, done.stderr
    [line] = done.stderr.splitlines()
    if expected == "json":
        fields = json.loads(line)
        assert (fields["event"], fields["level"], fields["logger"]) == ("probe line 42", "warning", "probe")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", fields["timestamp"])
    else:
        assert not line.startswith("{") and "probe line 42" in line and "warning" in line


def test_an_unknown_log_format_is_refused_naming_the_variable():
    done = log_one_line({"DEBUG": "true", "LOG_FORMAT": "xml"})

    assert done.returncode != 0
    assert "ImproperlyConfigured: LOG_FORMAT must be json or console, got 'xml'" in done.stderr


def test_a_line_in_a_span_carries_its_trace_and_span_ids():
    context = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0x00F067AA0BA902B7, is_remote=False
    )
    with trace.use_span(trace.NonRecordingSpan(context)):
        inside = json.loads(render("in a span"))
    outside = json.loads(render("outside"))

    assert (inside["trace_id"], inside["span_id"]) == ("0af7651916cd43dd8448eb211c80319c", "00f067aa0ba902b7")
    assert "trace_id" not in outside and "span_id" not in outside


def test_gunicorns_access_line_becomes_an_http_request_event():
    config = logs.logging_config(log_format="json", level="INFO", secrets=())
    spec = dict(config["formatters"]["structured"])
    formatter = spec.pop("()")(**spec)
    atoms = {"h": "10.0.0.1", "m": "POST", "U": "/api/v1/sessions/", "s": "201", "D": 12345, "B": "512",
             "a": "curl/8", "{authorization}i": "Token hidden"}  # fmt: skip
    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, "%(h)s %(m)s %(U)s", (atoms,), None)

    fields = json.loads(formatter.format(record))

    assert fields["event"] == "http.request"
    assert (fields["request_method"], fields["request_path"], fields["status"], fields["duration_ms"]) == (
        "POST",
        "/api/v1/sessions/",
        201,
        12.345,
    )
    assert "Token hidden" not in json.dumps(fields)


# --- context ---------------------------------------------------------------------------------


def test_each_celery_task_starts_with_a_fresh_context():
    logs.bind(session_id="left-over-from-the-last-task", tenant=1)

    task_prerun.send(sender=None, task_id="message-2", task=None, args=(), kwargs={})

    assert structlog.contextvars.get_contextvars() == {"message_id": "message-2", "celery_task": None}


def transition_records(caplog) -> list[dict]:
    return [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "session.transition"]


def test_an_api_transition_logs_one_line_with_the_session_its_tenant_and_the_request(
    api, caplog, django_capture_on_commit_callbacks
):
    caplog.set_level(logging.INFO)
    logs.bind(session_id="left-over-from-the-last-request")
    created = api.post("/api/v1/sessions/", dag_payload(), format="json")
    session_id = created.json()["id"]

    with django_capture_on_commit_callbacks(execute=True):
        assert api.post(f"/api/v1/sessions/{session_id}/start/").status_code == 202

    [line] = transition_records(caplog)
    event = SessionEvent.objects.get(session_id=session_id, to_status="queued")
    assert line["session_id"] == session_id and line["tenant"] == event.session.tenant_id
    assert (line["from_status"], line["to_status"], line["reason"], line["actor"], line["version"]) == (
        "pending",
        "queued",
        "started",
        "user:alice",
        1,
    )
    context = structlog.contextvars.get_contextvars()
    assert (context["request_method"], context["request_path"]) == ("POST", f"/api/v1/sessions/{session_id}/start/")
    assert context["session_id"] == session_id


# --- a full run ------------------------------------------------------------------------------

# The only lines allowed not to be JSON: Celery's SIGTERM handler prints an empty line and this
# straight to stdout (celery/apps/worker.py, _shutdown_handler, safe_say): logging from a signal
# handler could deadlock on the handler's lock, so Celery does not, and neither could we.
CELERY_SHUTDOWN_LINE = re.compile(r"^worker: (Warm|Cold) shutdown \(MainProcess\)$")


def without_celery_shutdown_lines(lines: list[str]) -> list[str]:
    kept = []
    for i, line in enumerate(lines):
        next_line = lines[i + 1] if i + 1 < len(lines) else ""
        if CELERY_SHUTDOWN_LINE.match(line) or (line == "" and CELERY_SHUTDOWN_LINE.match(next_line)):
            continue
        kept.append(line)
    return kept


@pytest.fixture
def known_secrets() -> dict[str, str]:
    token = secrets.token_hex(8)
    return {
        "SECRET_KEY": f"logtest-secret-key-{token}",
        "db_password": f"logtest-db-pw-{token}",
        "METRICS_TOKEN": f"logtest-metrics-{token}",
        "FLOWER_BASIC_AUTH": f"admin:logtest-flower-{token}",
        # A task key below is this too: the orchestrator does log it (a transition's reason),
        # so the redaction is seen at work in a real process, not only asserted by absence.
        "OPENAI_API_KEY": f"sk-logtest-{token}",
    }


@pytest.fixture
def json_stack(request, transactional_db, known_secrets):
    """The stack fixture's processes, logging JSON with the known secrets in their environment
    (the test database trusts any password)."""
    db = settings.DATABASES["default"]
    database_url = f"postgres://{db['USER']}:{known_secrets['db_password']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    env = {name: value for name, value in known_secrets.items() if name.isupper()}
    env = {**env, "DATABASE_URL": database_url, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}
    with running_stack(request, env=env) as running:
        yield running


def read_lines(stack: Stack) -> dict[str, list[str]]:
    return {log.stem: log.read_text(errors="replace").splitlines() for log in stack.logs.glob("*.log")}


@pytest.mark.e2e
def test_a_full_run_logs_json_lines_with_context_and_no_secret(json_stack, known_secrets):
    json_stack.beat("beat")
    json_stack.agent("builder", ["system_design", "code_generation"])
    canary = known_secrets["OPENAI_API_KEY"]
    payload = {
        "requirements": "two steps",
        "tasks": [
            {"key": canary, "title": "Design", "capability": "system_design"},
            {"key": "build", "title": "Build", "capability": "code_generation", "depends_on": [canary]},
        ],
    }
    client = member_client("acme", "alice")
    session_id = create_and_start(client, payload)
    assert wait_for_status(client, session_id, {"completed", "failed"})["status"] == "completed"
    json_stack.stop()  # the shutdown lines are checked too
    lines = read_lines(json_stack)
    assert {"orchestrator", "beat", "builder"} <= set(lines)

    # (a) every line of every process is a JSON object (or Celery's known shutdown line)
    records = []
    for name, text in lines.items():
        for line in without_celery_shutdown_lines(text):
            try:
                fields = json.loads(line)
            except ValueError:
                raise AssertionError(f"{name}.log has a line that is not JSON: {line!r}") from None
            assert isinstance(fields, dict) and {"event", "level", "logger", "timestamp"} <= set(fields), line
            records.append((name, fields))

    # (b) the transitions and task outcomes carry what they are about
    tenant = SessionEvent.objects.filter(session_id=session_id).first().session.tenant_id
    transitions = [f for _, f in records if f["event"] == "session.transition" and f["session_id"] == session_id]
    assert [(t["from_status"], t["to_status"]) for t in transitions] == [
        ("queued", "running"),
        ("running", "completed"),
    ]  # pending -> queued came from the API, in this process
    assert all(t["tenant"] == tenant for t in transitions)
    assert transitions[0]["reason"] == "task [redacted] claimed by builder"  # the canary, redacted
    finished = [f for name, f in records if f["event"] == "task.finished" and name == "builder"]
    assert len(finished) == 2
    for line in finished:
        assert line["session_id"] == session_id and line["tenant"] == tenant and line["agent"] == "builder"
        assert line["task_id"] and line["outcome"] == "completed" and line["attempt"] == 1
        assert line["duration_s"] >= 0
    assert any(f["event"] == "worker.starting" for name, f in records if name == "orchestrator")
    assert any(f["event"] == "agent.starting" for name, f in records if name == "builder")
    assert any(f["logger"].startswith("celery.beat") for name, f in records if name == "beat")

    # (c) no secret of the environment in any log, in any form
    everything = "\n".join("\n".join(text) for text in lines.values())
    for name, value in known_secrets.items():
        for form in {value, quote(value, safe=""), value.partition(":")[2] or value}:
            assert form not in everything, f"{name} appears in the logs"
