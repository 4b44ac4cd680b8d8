"""End to end through the External Agent Protocol: the REST API -> the canvas -> an EAP gateway
(a real `run_agent --executor eap` worker process) -> an external agent over HTTP -> back.

The external agent is the reference agent (examples/eap_agent.py) started as its own process
against a live server, or, for the failure cases it cannot play, an endpoint in this process.
"""

import hashlib
import hmac
import json
import re
import signal
import sys
import threading
import time
import uuid
from io import StringIO

import httpx
import pytest
from django.core.management import call_command

from agents import eap
from agents.models import Agent, EapDelivery
from sessions.models import SETTLED, SessionEvent
from tasks.models import Task
from tenants.models import Membership

from .conftest import ROOT, Stack, create_and_start, member_client, wait_for_status, wait_until
from .test_eap import Endpoint, inline

pytestmark = pytest.mark.e2e
REFERENCE = ROOT / "examples" / "eap_agent.py"
CAPABILITIES = ["documentation", "code_review"]
TOKEN_PATTERN = re.compile(r"eap_[0-9a-f]{12}_")


def operator_token() -> str:
    out = StringIO()
    call_command(
        "bootstrap_tenant",
        "acme",
        user="olga",
        role=Membership.Role.OPERATOR,
        rotate=True,
        stdout=out,
        stderr=StringIO(),
    )
    return out.getvalue().strip().splitlines()[-1]


@pytest.fixture
def gateway(stack, monkeypatch):
    """Starts the EAP gateway worker; the environment set here reaches it (Stack copies it)."""
    monkeypatch.setenv("EAP_POLL_INTERVAL_SECONDS", "0.1")

    def start(**env: str) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        stack.agent("eap-gateway", CAPABILITIES, executor="eap", concurrency=2)

    return start


@pytest.fixture
def processes(transactional_db):
    """Processes of a test that needs no Celery worker."""
    running = Stack()
    yield running
    running.stop()


def start_reference(stack: Stack, url: str, *, name: str, mode: str, extra: tuple[str, ...] = ()) -> dict:
    """The reference agent as its own process; returns the line it announces itself with."""
    argv = [sys.executable, str(REFERENCE), "--url", url, "--name", name, "--mode", mode,
            "--capabilities", ",".join(CAPABILITIES), "--poll-interval", "0.2", *extra]  # fmt: skip
    proc = stack._spawn(name, argv, env={"EAP_OPERATOR_TOKEN": operator_token()})
    log = stack.logs / f"{name}.log"

    def announced() -> dict | None:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited with {proc.returncode}: {log.read_text()}")
        lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
        return json.loads(lines[0]) if lines else None

    return wait_until(announced, what=f"{name} to register")


def two_tasks(**params) -> dict:
    return {
        "requirements": "document the rate limiter",
        "tasks": [
            {"key": "docs", "title": "Docs", "capability": "documentation",
             "instructions": "Write three short paragraphs about the limiter", "params": params},
            {"key": "review", "title": "Review", "capability": "code_review", "depends_on": ["docs"],
             "instructions": "Review them"},
        ],
    }  # fmt: skip


def assert_no_secret_in_logs(stack: Stack) -> None:
    secrets = [s for s in Agent.objects.exclude(mode="").values_list("signing_secret", flat=True)]
    for log in stack.logs.glob("*.log"):
        text = log.read_text(errors="replace")
        assert not TOKEN_PATTERN.search(text), f"an agent token in {log.name}"
        assert not any(secret in text for secret in secrets), f"a signing secret in {log.name}"


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_a_session_completes_through_the_reference_agent(stack, live_server, gateway, mode):
    gateway()
    announced = start_reference(stack, live_server.url, name=f"ref-{mode}", mode=mode)
    client = member_client("acme", "dev")

    session_id = create_and_start(client, two_tasks())
    body = wait_for_status(client, session_id, SETTLED)

    assert body["status"] == "completed", body
    for task in Task.objects.filter(session_id=session_id).select_related("agent"):
        assert task.agent.name == "eap-gateway"
        assert task.result["external_agent"] == f"ref-{mode}"
        assert task.result["mode"] == mode
        assert "words in the instructions" in task.result["output"]
    docs = Task.objects.get(session_id=session_id, key="docs")
    assert docs.result["output"] == "reference agent: 7 words in the instructions of 'Docs'"
    deliveries = EapDelivery.objects.filter(task__session_id=session_id)
    assert {(d.state, d.agent_id, d.attempt) for d in deliveries} == {("done", announced["agent_id"], 1)}
    assert deliveries.count() == 2
    assert_no_secret_in_logs(stack)


@pytest.mark.parametrize("mode", ["push", "pull"])
def test_a_task_pinned_to_an_external_agent_reaches_it_through_the_default_stacks_gateway(stack, live_server, mode):
    # As the Procfile runs them: a gateway with no capability of its own (pinned tasks only) and a
    # scripted worker that has the task's capability and must not get it.
    stack.agent("eap-gateway", [], executor="eap", concurrency=2)
    stack.agent("builder", ["documentation"])
    announced = start_reference(stack, live_server.url, name=f"pinned-{mode}", mode=mode)
    start_reference(stack, live_server.url, name=f"other-{mode}", mode=mode)  # same capability, not pinned
    client = member_client("acme", "dev")
    task = {"key": "docs", "title": "Docs", "capability": "documentation", "agent": f"pinned-{mode}",
            "instructions": "Describe the limiter"}  # fmt: skip

    session_id = create_and_start(client, {"requirements": "pinned", "tasks": [task]})
    body = wait_for_status(client, session_id, SETTLED)

    assert body["status"] == "completed", body
    done = Task.objects.select_related("agent").get(session_id=session_id, key="docs")
    assert (done.agent.name, done.result["external_agent"]) == ("eap-gateway", f"pinned-{mode}")
    assert EapDelivery.objects.get(task=done).agent_id == announced["agent_id"]


def test_another_tenants_external_agent_cannot_be_pinned(db):
    other = member_client("globex", "ops", role="operator")
    bot = {"name": "globex-bot", "capabilities": ["documentation"], "mode": "pull"}
    registered = other.post("/api/v1/eap/register/", bot, format="json")
    assert registered.status_code == 201
    task = {"key": "docs", "title": "Docs", "capability": "documentation", "agent": "globex-bot"}

    body = {"requirements": "x", "tasks": [task]}
    response = member_client("acme", "dev").post("/api/v1/sessions/", body, format="json")

    assert response.status_code == 400 and "tasks[0].agent" in response.json()["error"]["details"]


def test_a_reported_failure_fails_the_task_and_skips_what_follows(stack, live_server, gateway):
    gateway()
    start_reference(stack, live_server.url, name="ref-push", mode="push", extra=("--inline",))
    client = member_client("acme", "dev")

    session_id = create_and_start(client, two_tasks(reference={"fail": True}))
    body = wait_for_status(client, session_id, SETTLED)

    assert body["status"] == "failed"
    docs = Task.objects.get(session_id=session_id, key="docs")
    assert docs.error == "external agent ref-push reported a failure: the reference agent was asked to fail"
    assert docs.attempts == 1  # a business failure is not retried
    assert Task.objects.get(session_id=session_id, key="review").status == "skipped"


def signed(secret: str, body: bytes, timestamp: int | None = None) -> dict:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-EAP-Timestamp": stamp, "X-EAP-Signature": f"sha256={digest}", "Content-Type": "application/json"}


def test_the_reference_agent_refuses_a_push_without_a_good_signature_and_stops_on_sigterm(processes, live_server):
    announced = start_reference(processes, live_server.url, name="ref-push", mode="push")
    agent = Agent.objects.get(pk=announced["agent_id"])
    url = announced["endpoint_url"] + "/task"
    task = {"delivery_id": 7, "task_id": str(uuid.uuid4()), "capability": "documentation", "instructions": "hi"}
    body = json.dumps(task).encode()
    good = signed(agent.signing_secret, body)

    with httpx.Client(timeout=10) as http:
        refusals = {
            "unsigned": http.post(url, content=body, headers={"Content-Type": "application/json"}),
            "another key": http.post(url, content=body, headers=signed("not-the-secret", body)),
            "tampered body": http.post(url, content=body.replace(b"hi", b"rm -rf /"), headers=good),
            "old timestamp": http.post(url, content=body, headers=signed(agent.signing_secret, body, 1_000_000)),
            "no timestamp": http.post(url, content=body, headers={"X-EAP-Signature": good["X-EAP-Signature"]}),
        }
        accepted = http.post(url, content=body, headers=good)
        replayed = http.post(url, content=body, headers=good)  # the same signed delivery again

    assert {why: r.status_code for why, r in refusals.items()} == dict.fromkeys(refusals, 401)
    assert refusals["tampered body"].json() == {"error": "bad X-EAP-Signature"}
    assert accepted.status_code == 202, accepted.text
    assert replayed.status_code == 202 and replayed.json()["repeat"] is True  # taken once, not run twice
    proc = processes.procs["ref-push"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert Agent.objects.get(pk=agent.pk).status == "draining"  # its last word


def test_the_inline_reference_agent_answers_a_repeated_push_with_the_same_result(processes, live_server):
    announced = start_reference(processes, live_server.url, name="ref-inline", mode="push", extra=("--inline",))
    secret = Agent.objects.get(pk=announced["agent_id"]).signing_secret
    task = {"delivery_id": 8, "task_id": str(uuid.uuid4()), "capability": "documentation", "instructions": "a b c"}
    body = json.dumps(task).encode()

    with httpx.Client(timeout=10) as http:
        first = http.post(announced["endpoint_url"] + "/task", content=body, headers=signed(secret, body))
        repeat = http.post(announced["endpoint_url"] + "/task", content=body, headers=signed(secret, body))

    assert first.status_code == 200 and first.json()["status"] == "completed", first.text
    # The gateway that repeats a push never read the first answer: it gets the same result again.
    assert (repeat.status_code, repeat.json()) == (200, first.json())


def heartbeat_until(stop: threading.Event, url: str, token: str) -> None:
    with httpx.Client(base_url=url, headers={"X-Agent-Token": token}, timeout=10) as http:
        while not stop.wait(0.5):
            http.post("/api/v1/eap/heartbeat/", json={"status": "online", "current_load": 0})


def test_a_push_agent_that_never_answers_fails_the_task_is_degraded_and_recovers(stack, live_server, gateway, settings):
    breaker = {"EAP_BREAKER_FAIL_MAX": "2", "EAP_BREAKER_RESET_SECONDS": "2"}
    gateway(EAP_PUSH_TIMEOUT_SECONDS="0.5", EAP_PUSH_RETRIES="1", **breaker)
    for name, value in breaker.items():  # this process reads the same circuit
        setattr(settings, name, int(value))
    endpoint = Endpoint()
    endpoint.reply = endpoint.never_answer
    operator = member_client("acme", "olga", role=Membership.Role.OPERATOR)
    registered = operator.post(
        "/api/v1/eap/register/",
        {"name": "ext-slow", "capabilities": ["documentation"], "mode": "push", "endpoint_url": endpoint.url},
        format="json",
    ).json()
    agent = Agent.objects.get(pk=registered["agent_id"])
    stop = threading.Event()
    beating = threading.Thread(target=heartbeat_until, args=(stop, live_server.url, registered["token"]))
    beating.start()
    client = member_client("acme", "dev")
    one_task = {"requirements": "docs", "tasks": [{"key": "docs", "title": "Docs", "capability": "documentation",
                                                   "max_attempts": 2}]}  # fmt: skip
    try:
        session_id = create_and_start(client, one_task)
        assert wait_for_status(client, session_id, SETTLED)["status"] == "failed"

        task = Task.objects.get(session_id=session_id)
        assert task.error.startswith("gave up after 2 attempts: "), task.error
        assert "ext-slow" in task.error and "circuit" in task.error, task.error
        assert len(endpoint.requests) >= 2  # the first attempt's POST, and its retry
        assert Agent.objects.get(pk=agent.pk).status == "degraded"

        endpoint.reply = inline({"status": "completed", "output": "back"})
        wait_until(lambda: eap.circuit_allows_call(agent), what="the circuit's reset time")
        session_id = create_and_start(client, one_task)
        assert wait_for_status(client, session_id, SETTLED)["status"] == "completed"
        assert Task.objects.get(session_id=session_id).result["output"] == "back"
        wait_until(lambda: Agent.objects.get(pk=agent.pk).status == "online", what="the agent online again")
    finally:
        stop.set()
        beating.join(timeout=10)
        endpoint.close()


def test_an_agent_that_never_reports_fails_the_task_at_its_deadline_and_the_session_settles(
    stack, live_server, gateway
):
    gateway()
    start_reference(stack, live_server.url, name="ref-silent", mode="pull")
    client = member_client("acme", "dev")
    payload = two_tasks(reference={"silent": True})
    payload["tasks"][0].update(timeout_seconds=3, max_attempts=1)

    session_id = create_and_start(client, payload)
    body = wait_for_status(client, session_id, SETTLED)

    assert body["status"] == "failed"
    docs = Task.objects.get(session_id=session_id, key="docs")
    assert (docs.status, docs.error) == ("failed", "external agent ref-silent did not report within 3s")
    assert EapDelivery.objects.get(task=docs).state == "cancelled"
    assert Task.objects.get(session_id=session_id, key="review").status == "skipped"
    last = SessionEvent.objects.filter(session_id=session_id).order_by("id").last()
    assert (last.from_status, last.to_status) == ("running", "failed")
    assert_no_secret_in_logs(stack)
