"""The External Agent Protocol: the API under /api/v1/eap/, the eap executor against a real HTTP
endpoint (a server in this process) and the pull API, the circuit breaker on the real Redis.
End to end with worker processes and the reference agent: test_eap_e2e.py."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pybreaker
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connections
from django.utils import timezone
from rest_framework.test import APIClient

from agents import eap
from agents.executors import TaskAborted, TaskContext, TaskFailed, TransientError, build_executor
from agents.executors.eap import EapExecutor
from agents.models import Agent, EapDelivery
from orchestrator_project.settings import env_float
from sessions.models import Session, SessionEvent
from tasks.models import Task
from tasks.running import task_context
from tasks.sweeps import sweep_degraded_sessions
from tasks.tasks import mark_silent_agents_offline
from tenants.models import Membership, Tenant

from .conftest import ROOT, at_once, error_of, member_client, wait_until

REGISTER = "/api/v1/eap/register/"
HEARTBEAT = "/api/v1/eap/heartbeat/"
NEXT = "/api/v1/eap/tasks/next/"


def result_url(task_id) -> str:
    return f"/api/v1/eap/tasks/{task_id}/result/"


@pytest.fixture
def operator(db) -> APIClient:
    return member_client("acme", "olga", role=Membership.Role.OPERATOR)


def register(client: APIClient, **body) -> dict:
    body = {"name": "ext-pull", "capabilities": ["documentation"], "mode": "pull", **body}
    response = client.post(REGISTER, body, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def as_agent(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_X_AGENT_TOKEN=token)
    return client


def running_task(capability: str = "documentation", key: str = "docs", attempts: int = 1) -> Task:
    tenant, _ = Tenant.objects.get_or_create(slug="acme", defaults={"name": "Acme"})
    session = Session.objects.create(tenant=tenant, title="t", requirements="r", status="running")
    return Task.objects.create(
        session=session,
        key=key,
        title=f"Write the {key}",
        instructions="Describe the rate limiter in three short paragraphs",
        capability=capability,
        status="running",
        attempts=attempts,
        started_at=timezone.now(),
    )


def offer(task: Task, seconds: float = 60) -> EapDelivery:
    return EapDelivery.objects.create(
        task=task, attempt=task.attempts, deadline=timezone.now() + timedelta(seconds=seconds)
    )


# Registration


def test_register_without_an_api_token_is_401(db):
    response = APIClient().post(REGISTER, {"name": "x", "capabilities": ["testing"], "mode": "pull"}, format="json")

    error_of(response, 401)
    assert not Agent.objects.exists()


@pytest.mark.parametrize("role", [Membership.Role.DEVELOPER, Membership.Role.VIEWER])
def test_register_with_a_developer_or_viewer_token_is_403(db, role):
    client = member_client("acme", "dave", role=role)

    response = client.post(REGISTER, {"name": "x", "capabilities": ["testing"], "mode": "pull"}, format="json")

    assert "operators and admins" in error_of(response, 403)["message"]
    assert not Agent.objects.exists()


@pytest.mark.parametrize("role", [Membership.Role.OPERATOR, Membership.Role.ADMIN])
def test_an_operator_or_admin_registers_an_agent_and_sees_its_token_once(db, role):
    client = member_client("acme", "olga", role=role)

    body = register(client, name="ext-1", capabilities=["testing", "code_review", "testing"])

    assert set(body) == {"agent_id", "token", "heartbeat_interval_s", "signing_secret"}
    agent = Agent.objects.get(pk=body["agent_id"])
    assert (agent.name, agent.mode, agent.executor, agent.status) == ("ext-1", "pull", "eap", "online")
    assert agent.capabilities == ["code_review", "testing"]
    assert agent.last_heartbeat is not None
    assert body["heartbeat_interval_s"] == 10
    # Only the hash is kept; the signing secret is kept as it is (it signs push bodies).
    assert agent.token_hash == hashlib.sha256(body["token"].encode()).hexdigest()
    assert body["token"].startswith(f"eap_{agent.token_prefix}_")
    row = Agent.objects.filter(pk=agent.pk).values().get()
    assert not any(body["token"] in str(value) for value in row.values())
    assert agent.signing_secret == body["signing_secret"]


def test_a_push_agent_registers_with_its_endpoint(operator, dns):
    dns["agents.example.com"] = "93.184.216.34"  # a public address, as DNS would answer
    body = register(operator, name="ext-push", mode="push", endpoint_url="https://agents.example.com:8443/eap")

    agent = Agent.objects.get(pk=body["agent_id"])
    assert (agent.mode, agent.endpoint_url) == ("push", "https://agents.example.com:8443/eap")


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"capabilities": ["testing"], "mode": "pull"}, "name"),
        ({"name": "Has Spaces", "capabilities": ["testing"], "mode": "pull"}, "name"),
        ({"name": "-dash-first", "capabilities": ["testing"], "mode": "pull"}, "name"),
        ({"name": 42, "capabilities": ["testing"], "mode": "pull"}, "name"),
        ({"name": "x" * 101, "capabilities": ["testing"], "mode": "pull"}, "name"),
        ({"name": "ext", "capabilities": [], "mode": "pull"}, "capabilities"),
        ({"name": "ext", "capabilities": "testing", "mode": "pull"}, "capabilities"),
        ({"name": "ext", "capabilities": ["mind_reading"], "mode": "pull"}, "capabilities[0]"),
        ({"name": "ext", "mode": "pull"}, "capabilities"),
        ({"name": "ext", "capabilities": ["testing"], "mode": "carrier-pigeon"}, "mode"),
        ({"name": "ext", "capabilities": ["testing"]}, "mode"),
        ({"name": "ext", "capabilities": ["testing"], "mode": "push"}, "endpoint_url"),
        ({"name": "ext", "capabilities": ["testing"], "mode": "push", "endpoint_url": "ftp://h/x"}, "endpoint_url"),
        ({"name": "ext", "capabilities": ["testing"], "mode": "push", "endpoint_url": "not a url"}, "endpoint_url"),
        ({"name": "ext", "capabilities": ["testing"], "mode": "pull", "endpoint_url": "http://h/"}, "endpoint_url"),
        ({"name": "ext", "capabilities": ["testing"], "mode": "pull", "token": "mine"}, "token"),
    ],
)
def test_register_refuses_a_bad_body_naming_the_field(operator, body, path):
    response = operator.post(REGISTER, body, format="json")

    error = error_of(response, 400)
    assert error["code"] == "invalid"
    assert path in error["details"], error
    assert not Agent.objects.exists()


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"just a string"'])
def test_register_refuses_malformed_json(operator, raw):
    response = operator.generic("POST", REGISTER, raw, content_type="application/json")

    error_of(response, 400)
    assert not Agent.objects.exists()


def test_a_taken_name_is_409_whether_an_external_agent_or_a_worker_has_it(operator):
    register(operator, name="ext-1")
    Agent.objects.create(name="builder", executor="scripted", capabilities=["testing"])

    for name in ("ext-1", "builder"):
        response = operator.post(REGISTER, {"name": name, "capabilities": ["testing"], "mode": "pull"}, format="json")
        assert f"an agent named '{name}' exists already" in error_of(response, 409)["message"]
    assert Agent.objects.count() == 2


def test_run_agent_refuses_to_take_over_an_external_agents_row(operator):
    register(operator, name="ext-1")

    with pytest.raises(CommandError, match="'ext-1' is the name of an external agent"):
        call_command("run_agent", name="ext-1", capabilities="testing", executor="scripted")
    assert Agent.objects.get(name="ext-1").mode == "pull"


# The agent's token


@pytest.mark.parametrize(("method", "path"), [("post", HEARTBEAT), ("get", NEXT), ("post", "result")])
def test_agent_endpoints_without_x_agent_token_are_401(operator, method, path):
    path = result_url(running_task().pk) if path == "result" else path

    response = getattr(APIClient(), method)(path, {}, format="json")

    error = error_of(response, 401)
    assert "missing X-Agent-Token" in error["message"]
    assert response["WWW-Authenticate"] == "X-Agent-Token"


def test_agent_endpoints_refuse_a_bad_token(operator):
    registered = register(operator)
    prefix = Agent.objects.get(pk=registered["agent_id"]).token_prefix
    operator_token = operator._credentials["HTTP_AUTHORIZATION"].split()[1]
    bad = ["garbage", f"eap_{prefix}_wrong", f"eap_{prefix}", "eap__x", operator_token, registered["token"] + "x"]

    for token in bad:
        response = as_agent(token).post(HEARTBEAT, {"status": "online", "current_load": 0}, format="json")
        assert "invalid X-Agent-Token" in error_of(response, 401)["message"], token
    # The right token, in the wrong header, is no agent token either.
    wrong_header = APIClient()
    wrong_header.credentials(HTTP_AUTHORIZATION=f"Token {registered['token']}")
    error_of(wrong_header.get(NEXT), 401)


def test_an_operator_token_cannot_act_as_an_agent(operator):
    register(operator)

    error_of(operator.post(HEARTBEAT, {"status": "online", "current_load": 0}, format="json"), 401)


# Heartbeats


def test_a_heartbeat_updates_the_agent(operator):
    registered = register(operator)
    Agent.objects.filter(pk=registered["agent_id"]).update(
        last_heartbeat=timezone.now() - timedelta(seconds=20), status="offline"
    )

    response = as_agent(registered["token"]).post(HEARTBEAT, {"status": "busy", "current_load": 3}, format="json")

    assert response.status_code == 204, response.content
    agent = Agent.objects.get(pk=registered["agent_id"])
    assert (agent.status, agent.current_load) == ("busy", 3)
    assert timezone.now() - agent.last_heartbeat < timedelta(seconds=5)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"status": "asleep", "current_load": 0}, "status"),
        ({"status": "online", "current_load": -1}, "current_load"),
        ({"status": "online", "current_load": "3"}, "current_load"),
        ({"status": "online", "current_load": True}, "current_load"),
        ({"current_load": 0}, "status"),
        ({"status": "online"}, "current_load"),
        ({"status": "online", "current_load": 0, "mood": "great"}, "mood"),
    ],
)
def test_a_bad_heartbeat_is_400(operator, body, path):
    registered = register(operator)

    response = as_agent(registered["token"]).post(HEARTBEAT, body, format="json")

    assert path in error_of(response, 400)["details"]


def test_draining_sticks_until_an_operator_resumes_the_agent(operator):
    registered = register(operator)
    agent = as_agent(registered["token"])

    agent.post(HEARTBEAT, {"status": "draining", "current_load": 1}, format="json")
    agent.post(HEARTBEAT, {"status": "online", "current_load": 0}, format="json")

    assert Agent.objects.get(pk=registered["agent_id"]).status == "draining"
    resumed = operator.post(f"/api/v1/agents/{registered['agent_id']}/resume/")
    assert resumed.status_code == 202, resumed.content
    agent.post(HEARTBEAT, {"status": "busy", "current_load": 1}, format="json")
    assert Agent.objects.get(pk=registered["agent_id"]).status == "busy"


def test_a_push_agent_with_an_open_circuit_stays_degraded_whatever_it_says(operator):
    registered = register(operator, name="ext-push", mode="push", endpoint_url="http://127.0.0.1:9/")
    agent = Agent.objects.get(pk=registered["agent_id"])
    eap.breaker_for(agent).open()
    assert Agent.objects.get(pk=agent.pk).status == "degraded"

    as_agent(registered["token"]).post(HEARTBEAT, {"status": "online", "current_load": 0}, format="json")

    assert Agent.objects.get(pk=agent.pk).status == "degraded"
    eap.breaker_for(agent).close()
    assert Agent.objects.get(pk=agent.pk).status == "online"


def test_the_circuits_of_many_agents_are_read_at_once_as_each_sees_its_own(operator):
    closed = Agent.objects.get(
        pk=register(operator, name="ext-a", mode="push", endpoint_url="http://127.0.0.1:9/")["agent_id"]
    )
    tripped = Agent.objects.get(
        pk=register(operator, name="ext-b", mode="push", endpoint_url="http://127.0.0.1:9/")["agent_id"]
    )
    pulling = Agent.objects.get(pk=register(operator, name="ext-pull")["agent_id"])
    eap.breaker_for(tripped).open()

    states = eap.circuit_states([closed, tripped, pulling])

    assert states == {closed.pk: pybreaker.STATE_CLOSED, tripped.pk: pybreaker.STATE_OPEN}
    assert states[tripped.pk] == eap.circuit_state(tripped)


# GET tasks/next


def test_next_is_204_when_nothing_is_offered(operator):
    registered = register(operator)
    running_task()  # running, but not offered to external agents

    response = as_agent(registered["token"]).get(NEXT)

    assert response.status_code == 204
    assert not response.content


def test_next_claims_the_oldest_offered_task_of_the_agents_capabilities(operator):
    registered = register(operator, capabilities=["documentation"])
    offer(running_task(capability="code_review", key="review"))
    older = offer(running_task(key="docs-1"))
    offer(running_task(key="docs-2"))
    agent = as_agent(registered["token"])

    response = agent.get(NEXT)

    assert response.status_code == 200, response.content
    body = response.json()
    task = older.task
    assert body == {
        "delivery_id": older.pk,
        "task_id": str(task.pk),
        "session_id": str(task.session_id),
        "capability": "documentation",
        "title": "Write the docs-1",
        "instructions": task.instructions,
        "params": {},
        "deadline": body["deadline"],
        "attempt": 1,
    }
    assert body["deadline"].endswith("Z")
    older.refresh_from_db()
    assert (older.state, older.agent_id) == ("claimed", registered["agent_id"])
    assert agent.get(NEXT).json()["title"] == "Write the docs-2"
    assert agent.get(NEXT).status_code == 204  # the code_review offer is not for this agent


def test_an_offer_of_an_attempt_the_task_moved_on_from_is_not_handed_out(operator):
    registered = register(operator)
    task = running_task(attempts=2)
    EapDelivery.objects.create(task=task, attempt=1, deadline=timezone.now() + timedelta(seconds=60))

    assert as_agent(registered["token"]).get(NEXT).status_code == 204


def test_a_push_agent_cannot_pull(operator):
    registered = register(operator, name="ext-push", mode="push", endpoint_url="http://127.0.0.1:9/")
    offer(running_task())

    response = as_agent(registered["token"]).get(NEXT)

    assert "push agent" in error_of(response, 409)["message"]
    assert EapDelivery.objects.get().state == "offered"


def test_a_draining_pull_agent_is_handed_nothing(operator):
    registered = register(operator)
    offer(running_task())
    as_agent(registered["token"]).post(HEARTBEAT, {"status": "draining", "current_load": 0}, format="json")

    assert as_agent(registered["token"]).get(NEXT).status_code == 204


def test_racing_pull_agents_never_claim_the_same_delivery(transactional_db):
    operator = member_client("acme", "olga", role=Membership.Role.OPERATOR)
    agents = [Agent.objects.get(pk=register(operator, name=f"ext-{n}")["agent_id"]) for n in range(6)]
    offers = [offer(running_task(key=f"docs-{n}")).pk for n in range(10)]
    claimed: dict[str, list[int]] = {}

    def pull(agent: Agent) -> None:
        its_claims = claimed[agent.name] = []
        while (delivery := eap.claim_next_delivery(agent)) is not None:
            its_claims.append(delivery.pk)

    _, failures = at_once([lambda agent=agent: pull(agent) for agent in agents])

    assert not failures, failures
    every_claim = [pk for its_claims in claimed.values() for pk in its_claims]
    assert sorted(every_claim) == sorted(offers)  # each delivery claimed exactly once
    for name, its_claims in claimed.items():
        assert set(EapDelivery.objects.filter(pk__in=its_claims).values_list("agent__name", "state")) <= {
            (name, "claimed")
        }


# POST tasks/{id}/result


def claimed_by(client_token: str, capability: str = "documentation") -> EapDelivery:
    """Offer a task and let the agent claim it through the API."""
    delivery = offer(running_task(capability=capability))
    response = as_agent(client_token).get(NEXT)
    assert response.status_code == 200, response.content
    delivery.refresh_from_db()
    return delivery


def test_an_agent_reports_its_task_completed(operator):
    registered = register(operator)
    delivery = claimed_by(registered["token"])
    result = {"status": "completed", "output": "three paragraphs", "artifacts": [{"path": "docs/rate.md"}]}

    response = as_agent(registered["token"]).post(result_url(delivery.task_id), result, format="json")

    assert response.status_code == 200, response.content
    assert response.json() == {**result, "error": ""}
    delivery.refresh_from_db()
    assert (delivery.state, delivery.error) == ("done", "")
    assert delivery.result == {**result, "error": ""}
    assert delivery.finished_at is not None


def test_a_failed_report_without_a_reason_gets_one(operator):
    registered = register(operator)
    delivery = claimed_by(registered["token"])

    as_agent(registered["token"]).post(result_url(delivery.task_id), {"status": "failed", "output": ""}, format="json")

    delivery.refresh_from_db()
    assert delivery.state == "done"
    assert delivery.error == "agent ext-pull reported a failure without saying why"


def test_an_agent_reporting_another_agents_task_is_409_and_the_task_is_untouched(operator):
    owner = register(operator, name="owner")
    intruder = register(operator, name="intruder")
    delivery = claimed_by(owner["token"])

    response = as_agent(intruder["token"]).post(
        result_url(delivery.task_id), {"status": "completed", "output": "mine now"}, format="json"
    )

    assert f"task {delivery.task_id} is not a running task of agent intruder" in error_of(response, 409)["message"]
    delivery.refresh_from_db()
    assert (delivery.state, delivery.agent_id, delivery.result) == ("claimed", owner["agent_id"], {})
    task = Task.objects.get(pk=delivery.task_id)
    assert (task.status, task.result, task.error) == ("running", {}, "")


@pytest.mark.parametrize("state", ["done", "cancelled"])
def test_reporting_a_finished_or_cancelled_delivery_is_409(operator, state):
    registered = register(operator)
    delivery = claimed_by(registered["token"])
    EapDelivery.objects.filter(pk=delivery.pk).update(state=state, error="the deadline passed")

    response = as_agent(registered["token"]).post(
        result_url(delivery.task_id), {"status": "completed", "output": "late"}, format="json"
    )

    assert f"its delivery is {state}" in error_of(response, 409)["message"]
    delivery.refresh_from_db()
    assert (delivery.state, delivery.result) == (state, {})


def test_reporting_a_task_that_has_moved_on_is_409(operator):
    registered = register(operator)
    delivery = claimed_by(registered["token"])
    Task.objects.filter(pk=delivery.task_id).update(status="cancelled")

    response = as_agent(registered["token"]).post(
        result_url(delivery.task_id), {"status": "completed", "output": "x"}, format="json"
    )

    assert "it is cancelled" in error_of(response, 409)["message"]
    assert EapDelivery.objects.get(pk=delivery.pk).state == "claimed"


def test_an_unknown_task_is_409_and_a_malformed_id_404(operator):
    import uuid

    registered = register(operator)
    agent = as_agent(registered["token"])
    body = {"status": "completed", "output": "x"}

    error_of(agent.post(result_url(uuid.uuid4()), body, format="json"), 409)
    error_of(agent.post(result_url("not-a-uuid"), body, format="json"), 404)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"status": "great", "output": "x"}, "status"),
        ({"output": "x"}, "status"),
        ({"status": "completed"}, "output"),
        ({"status": "completed", "output": 5}, "output"),
        ({"status": "completed", "output": "nul \x00 char"}, "output"),
        ({"status": "completed", "output": "x", "artifacts": "a.txt"}, "artifacts"),
        ({"status": "completed", "output": "x", "artifacts": [1]}, "artifacts[0]"),
        ({"status": "failed", "output": "x", "error": ["why"]}, "error"),
        ({"status": "completed", "output": "x", "diff": "+1"}, "diff"),
    ],
)
def test_a_bad_result_is_400_and_nothing_is_written(operator, body, path):
    registered = register(operator)
    delivery = claimed_by(registered["token"])

    response = as_agent(registered["token"]).post(result_url(delivery.task_id), body, format="json")

    assert path in error_of(response, 400)["details"]
    delivery.refresh_from_db()
    assert (delivery.state, delivery.result, delivery.error) == ("claimed", {}, "")


@pytest.mark.parametrize("raw", [b'{"status": "completed", "output": ', b"\xff\xfe", b"[]"])
def test_a_malformed_json_result_is_400_and_nothing_is_written(operator, raw):
    registered = register(operator)
    delivery = claimed_by(registered["token"])

    response = as_agent(registered["token"]).generic(
        "POST", result_url(delivery.task_id), raw, content_type="application/json"
    )

    error_of(response, 400)
    delivery.refresh_from_db()
    assert (delivery.state, delivery.result) == ("claimed", {})


# The eap executor


class Endpoint:
    """A push agent's HTTP endpoint in this process: records each request, answers with `reply`."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict, bytes]] = []
        self.reply = lambda body: (202, b"{}")
        self.released = threading.Event()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                endpoint.requests.append(({**self.headers}, body))
                status, content = endpoint.reply(body)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except OSError:
                    pass  # the gateway gave up on this request already

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/eap"

    def never_answer(self, body: bytes) -> tuple[int, bytes]:
        self.released.wait(10)
        return 200, b"{}"

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def inline(result: dict) -> Callable:
    return lambda body: (200, json.dumps(result).encode())


@pytest.fixture
def endpoint():
    running = Endpoint()
    yield running
    running.close()


@pytest.fixture
def fast_eap(settings):
    settings.EAP_PUSH_TIMEOUT_SECONDS = 0.3
    settings.EAP_PUSH_RETRIES = 1
    settings.EAP_BREAKER_FAIL_MAX = 5
    settings.EAP_BREAKER_RESET_SECONDS = 1
    settings.EAP_POLL_INTERVAL_SECONDS = 0.05
    return settings


@pytest.fixture
def gateway_operator(transactional_db) -> APIClient:
    return member_client("acme", "olga", role=Membership.Role.OPERATOR)


def push_agent(client: APIClient, url: str, name: str = "ext-push") -> tuple[Agent, dict]:
    registered = register(client, name=name, mode="push", endpoint_url=url)
    return Agent.objects.get(pk=registered["agent_id"]), registered


def context_for(task: Task, *, timeout: float = 10.0, abort=lambda: False) -> TaskContext:
    """What run_task would give the executor, with a short deadline and an abort of our own."""
    return replace(task_context(task, task.attempts), timeout_s=timeout, should_abort=abort)


def next_attempt(task: Task) -> Task:
    Task.objects.filter(pk=task.pk).update(attempts=task.attempts + 1)
    task.refresh_from_db()
    return task


def test_build_executor_knows_eap():
    assert build_executor("eap").kind == "eap"


def test_a_pushed_task_answered_inline_completes_and_its_body_is_signed(gateway_operator, fast_eap, endpoint):
    agent, registered = push_agent(gateway_operator, endpoint.url)
    endpoint.reply = inline({"status": "completed", "output": "done", "artifacts": [{"path": "a.md"}]})
    task = running_task()

    result = EapExecutor().execute(context_for(task))

    assert result == {"output": "done", "artifacts": [{"path": "a.md"}], "external_agent": "ext-push", "mode": "push"}
    [(headers, body)] = endpoint.requests
    timestamp = headers["X-EAP-Timestamp"]
    assert abs(int(timestamp) - time.time()) < 60
    assert headers["X-EAP-Signature"] == eap.sign(registered["signing_secret"], timestamp, body)
    assert headers["Content-Type"] == "application/json"
    payload = json.loads(body)
    fields = {"delivery_id", "task_id", "session_id", "capability", "title", "instructions", "params", "deadline"}
    assert set(payload) == fields | {"attempt"}
    assert (payload["task_id"], payload["attempt"], payload["capability"]) == (str(task.pk), 1, "documentation")
    delivery = EapDelivery.objects.get(task=task)
    assert payload["delivery_id"] == delivery.pk  # signed with the body: an agent can refuse a replay
    assert (delivery.state, delivery.agent_id, delivery.attempt) == ("done", agent.pk, 1)


def test_a_pushed_task_accepted_with_202_completes_when_the_agent_reports(gateway_operator, fast_eap, endpoint):
    agent, registered = push_agent(gateway_operator, endpoint.url)
    task = running_task()
    reporter = as_agent(registered["token"])

    def report_once_accepted() -> None:
        try:
            wait_until(lambda: endpoint.requests, what="the push")
            response = reporter.post(result_url(task.pk), {"status": "completed", "output": "later"}, format="json")
            assert response.status_code == 200, response.content
        finally:
            connections.close_all()

    thread = threading.Thread(target=report_once_accepted)
    thread.start()
    result = EapExecutor().execute(context_for(task))
    thread.join(timeout=30)

    assert result["output"] == "later"
    assert result["external_agent"] == agent.name


def test_a_reported_failure_fails_the_task_with_the_agents_reason(gateway_operator, fast_eap, endpoint):
    push_agent(gateway_operator, endpoint.url)
    endpoint.reply = inline({"status": "failed", "output": "half", "error": "the linter crashed"})

    with pytest.raises(TaskFailed, match="external agent ext-push reported a failure: the linter crashed") as failed:
        EapExecutor().execute(context_for(running_task()))
    assert failed.value.result["output"] == "half"


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (b"{not json", "replied with malformed JSON"),
        (b"", "replied with malformed JSON"),
        (b'{"status": "completed", "output": "x", "artifacts": [{"score": NaN}]}', "replied with malformed JSON"),
        (b'{"status": "done", "output": "x"}', "replied with an invalid result: status"),
        (b'{"status": "completed"}', "replied with an invalid result: output"),
        (b"[]", "replied with an invalid result: body"),
    ],
)
def test_a_push_reply_that_is_not_a_result_fails_the_task_naming_the_agent(
    gateway_operator, fast_eap, endpoint, reply, reason
):
    push_agent(gateway_operator, endpoint.url)
    endpoint.reply = lambda body: (200, reply)
    task = running_task()

    with pytest.raises(TaskFailed, match=f"external agent ext-push {reason}"):
        EapExecutor().execute(context_for(task))
    assert len(endpoint.requests) == 1
    assert EapDelivery.objects.get(task=task).state == "cancelled"


def test_a_refusal_fails_the_task_at_once_without_retry_or_tripping_the_circuit(gateway_operator, fast_eap, endpoint):
    agent, _ = push_agent(gateway_operator, endpoint.url)
    endpoint.reply = lambda body: (400, b'{"error": "unknown capability"}')

    with pytest.raises(TaskFailed, match=r"ext-push did not take the task: HTTP 400$"):  # never its body
        EapExecutor().execute(context_for(running_task()))
    assert len(endpoint.requests) == 1
    assert eap.breaker_for(agent).fail_counter == 0


def test_an_unexpected_2xx_fails_the_task(gateway_operator, fast_eap, endpoint):
    push_agent(gateway_operator, endpoint.url)
    endpoint.reply = lambda body: (204, b"")

    with pytest.raises(TaskFailed, match="answered HTTP 204; expected 200 with a result, or 202"):
        EapExecutor().execute(context_for(running_task()))


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_a_transient_answer_is_retried_then_the_attempt_is_transient(gateway_operator, fast_eap, endpoint, status):
    push_agent(gateway_operator, endpoint.url)
    endpoint.reply = lambda body: (status, b"busy")

    with pytest.raises(TransientError, match=f"external agent ext-push did not take the task: HTTP {status}"):
        EapExecutor().execute(context_for(running_task()))
    assert len(endpoint.requests) == 2  # EAP_PUSH_RETRIES = 1


def test_a_transient_failure_then_success_within_one_attempt_completes(gateway_operator, fast_eap, endpoint):
    push_agent(gateway_operator, endpoint.url)
    replies = iter([(503, b""), (200, json.dumps({"status": "completed", "output": "ok"}).encode())])
    endpoint.reply = lambda body: next(replies)

    assert EapExecutor().execute(context_for(running_task()))["output"] == "ok"
    assert len(endpoint.requests) == 2


def test_an_unreachable_endpoint_is_transient(gateway_operator, fast_eap):
    push_agent(gateway_operator, "http://127.0.0.1:9/nobody-listens")

    with pytest.raises(TransientError, match="external agent ext-push did not take the task: ConnectError"):
        EapExecutor().execute(context_for(running_task()))


def test_a_push_agent_that_never_answers_trips_its_circuit_which_closes_once_it_answers(
    gateway_operator, fast_eap, endpoint
):
    fast_eap.EAP_BREAKER_FAIL_MAX = 2
    agent, registered = push_agent(gateway_operator, endpoint.url)
    endpoint.reply = endpoint.never_answer
    task = running_task()

    # Attempt 1: the POST times out, is tried once more, times out again: the circuit opens.
    with pytest.raises(TransientError, match=r"ext-push is unreachable: its circuit is open \(last failure: no answer"):
        EapExecutor().execute(context_for(task))
    assert len(endpoint.requests) == 2
    assert eap.circuit_state(agent) == pybreaker.STATE_OPEN
    assert Agent.objects.get(pk=agent.pk).status == "degraded"

    # While it is open the agent gets nothing; its heartbeats do not make it healthy. (The reset
    # time is long for this part: with 1 s, a slow machine passed it between the check and the
    # call, and the call was the trial.)
    fast_eap.EAP_BREAKER_RESET_SECONDS = 60
    as_agent(registered["token"]).post(HEARTBEAT, {"status": "online", "current_load": 0}, format="json")
    assert Agent.objects.get(pk=agent.pk).status == "degraded"
    assert not eap.circuit_allows_call(agent)
    with pytest.raises(TransientError, match="the circuit of ext-push is open"):
        EapExecutor().execute(context_for(next_attempt(task)))
    assert len(endpoint.requests) == 2

    # After the reset time one trial call goes through; it succeeds, the circuit closes.
    fast_eap.EAP_BREAKER_RESET_SECONDS = 1
    endpoint.reply = inline({"status": "completed", "output": "back"})
    wait_until(lambda: eap.circuit_allows_call(agent), timeout=10, what="the circuit's reset time")
    assert EapExecutor().execute(context_for(next_attempt(task)))["output"] == "back"
    assert eap.circuit_state(agent) == pybreaker.STATE_CLOSED
    assert Agent.objects.get(pk=agent.pk).status == "online"


def test_with_no_live_external_agent_the_attempt_is_transient(gateway_operator, fast_eap):
    register(gateway_operator, name="elsewhere", capabilities=["testing"])
    stale = register(gateway_operator, name="silent")
    Agent.objects.filter(pk=stale["agent_id"]).update(last_heartbeat=timezone.now() - timedelta(minutes=5))

    with pytest.raises(TransientError, match="tenant has capability documentation"):
        EapExecutor().execute(context_for(running_task()))
    assert not EapDelivery.objects.exists()


def test_a_pull_agent_claims_and_reports_the_offered_task(gateway_operator, fast_eap):
    registered = register(gateway_operator)
    task = running_task()
    puller = as_agent(registered["token"])

    def pull_and_report() -> None:
        try:
            claimed = wait_until(lambda: puller.get(NEXT).status_code == 200, what="an offer")
            assert claimed
            puller.post(result_url(task.pk), {"status": "completed", "output": "pulled"}, format="json")
        finally:
            connections.close_all()

    thread = threading.Thread(target=pull_and_report)
    thread.start()
    result = EapExecutor().execute(context_for(task))
    thread.join(timeout=30)

    assert (result["output"], result["external_agent"], result["mode"]) == ("pulled", "ext-pull", "pull")


def test_a_push_agent_is_preferred_and_pull_is_the_fallback(gateway_operator, fast_eap, endpoint):
    fast_eap.EAP_BREAKER_RESET_SECONDS = 60  # opened below, it must stay open for the test
    register(gateway_operator, name="puller")
    agent, _ = push_agent(gateway_operator, endpoint.url)
    endpoint.reply = inline({"status": "completed", "output": "pushed"})

    assert EapExecutor().execute(context_for(running_task()))["output"] == "pushed"

    eap.breaker_for(agent).open()
    task = running_task(key="second")
    with pytest.raises(TaskFailed, match=r"no external agent claimed the task within 0\.3s"):
        EapExecutor().execute(context_for(task, timeout=0.3))
    assert EapDelivery.objects.get(task=task).agent is None


def test_an_aborted_task_cancels_its_delivery(gateway_operator, fast_eap):
    registered = register(gateway_operator)
    task = running_task()

    with pytest.raises(TaskAborted):
        EapExecutor().execute(context_for(task, abort=lambda: True))

    assert EapDelivery.objects.get(task=task).state == "cancelled"
    assert as_agent(registered["token"]).get(NEXT).status_code == 204


def test_an_agent_that_never_reports_fails_the_task_at_its_deadline(gateway_operator, fast_eap, endpoint):
    _, registered = push_agent(gateway_operator, endpoint.url)
    task = running_task()

    with pytest.raises(TaskFailed, match=r"external agent ext-push did not report within 0\.5s"):
        EapExecutor().execute(context_for(task, timeout=0.5))

    delivery = EapDelivery.objects.get(task=task)
    assert (delivery.state, delivery.error) == ("cancelled", "external agent ext-push did not report within 0.5s")
    late = as_agent(registered["token"]).post(
        result_url(task.pk), {"status": "completed", "output": "x"}, format="json"
    )
    assert "its delivery is cancelled" in error_of(late, 409)["message"]


def test_an_agent_that_goes_silent_while_running_makes_the_attempt_transient(gateway_operator, fast_eap, endpoint):
    agent, _ = push_agent(gateway_operator, endpoint.url)
    task = running_task()

    def silence_after_the_push() -> None:
        try:
            wait_until(lambda: endpoint.requests, what="the push")
            Agent.objects.filter(pk=agent.pk).update(last_heartbeat=timezone.now() - timedelta(minutes=5))
        finally:
            connections.close_all()

    thread = threading.Thread(target=silence_after_the_push)
    thread.start()
    with pytest.raises(TransientError, match="external agent ext-push went silent"):
        EapExecutor().execute(context_for(task))
    thread.join(timeout=30)
    assert EapDelivery.objects.get(task=task).state == "cancelled"


def test_a_new_attempt_supersedes_the_open_delivery_of_an_earlier_one(gateway_operator, fast_eap, endpoint):
    push_agent(gateway_operator, endpoint.url)
    task = running_task()
    stale = offer(task)
    endpoint.reply = inline({"status": "completed", "output": "again"})

    EapExecutor().execute(context_for(next_attempt(task)))

    stale.refresh_from_db()
    assert (stale.state, stale.error) == ("cancelled", "superseded by attempt 2")


def test_no_token_or_signing_secret_reaches_a_log(gateway_operator, fast_eap, endpoint, caplog):
    caplog.set_level(logging.DEBUG)
    _, registered = push_agent(gateway_operator, endpoint.url)
    puller = register(gateway_operator, name="puller")
    endpoint.reply = inline({"status": "completed", "output": "ok"})

    EapExecutor().execute(context_for(running_task()))
    for token in (registered["token"], puller["token"]):
        as_agent(token).post(HEARTBEAT, {"status": "online", "current_load": 0}, format="json")
        as_agent(token + "x").post(HEARTBEAT, {"status": "online", "current_load": 0}, format="json")
    as_agent(puller["token"]).get(NEXT)

    assert "registered" in caplog.text  # the log did capture the registrations
    for secret in (registered["token"], registered["signing_secret"], puller["token"], puller["signing_secret"]):
        assert secret not in caplog.text
        assert secret[-20:] not in caplog.text


# Routing and the degraded sweep see only our Celery workers


@pytest.fixture
def waiting_session(db, settings) -> Session:
    settings.DEGRADED_AFTER_SECONDS = 5
    tenant = Tenant.objects.create(slug="acme", name="Acme")
    session = Session.objects.create(tenant=tenant, title="t", requirements="r", status="running")
    Task.objects.create(
        session=session,
        key="docs",
        title="docs",
        capability="documentation",
        status="queued",
        queued_at=timezone.now() - timedelta(seconds=60),
    )
    return session


def live(name: str, **fields) -> Agent:
    return Agent.objects.create(
        name=name, capabilities=["documentation"], status="online", last_heartbeat=timezone.now(), **fields
    )


def test_an_external_agent_alone_does_not_keep_a_session_from_degrading(waiting_session):
    live("ext", executor="eap", mode="pull", token_prefix="a1")

    assert sweep_degraded_sessions()["degraded"] == 1
    event = SessionEvent.objects.get(session=waiting_session)
    assert "needs documentation and no live agent has it" in event.reason


def test_a_gateway_serves_a_capability_only_while_an_external_agent_can_take_it(waiting_session):
    live("eap-gateway", executor="eap")
    pusher = live("ext", executor="eap", mode="push", endpoint_url="http://127.0.0.1:9/", token_prefix="a1")
    eap.breaker_for(pusher).open()

    assert sweep_degraded_sessions()["degraded"] == 1

    live("puller", executor="eap", mode="pull", token_prefix="b2")
    assert sweep_degraded_sessions()["recovered"] == 1


def test_a_silent_external_agent_is_marked_offline_like_a_worker(operator):
    registered = register(operator)
    Agent.objects.filter(pk=registered["agent_id"]).update(last_heartbeat=timezone.now() - timedelta(minutes=5))

    assert mark_silent_agents_offline() == {"offline": 1, "recovered": 0}
    assert Agent.objects.get(pk=registered["agent_id"]).status == "offline"
    as_agent(registered["token"]).post(HEARTBEAT, {"status": "online", "current_load": 0}, format="json")
    assert Agent.objects.get(pk=registered["agent_id"]).status == "online"


def test_routing_never_picks_an_external_agent(db):
    external = live("ext", executor="eap", mode="pull", token_prefix="a1")
    worker = live("builder", executor="scripted")

    assert not external.can_take("documentation")
    assert worker.can_take("documentation")


# Settings and admin


@pytest.mark.parametrize(("raw", "expected"), [("0.25", 0.25), ("2", 2.0), ("", 0.3)])
def test_env_float_reads_numbers_and_defaults_when_empty(monkeypatch, raw, expected):
    monkeypatch.setenv("IO_TEST_FLOAT", raw)

    assert env_float("IO_TEST_FLOAT", 0.3, minimum=0.05) == expected


@pytest.mark.parametrize(
    ("raw", "message"), [("soon", "must be a number"), ("0.01", "must be at least 0.05"), ("nan", "")]
)
def test_env_float_rejects_a_bad_value_naming_the_variable(monkeypatch, raw, message):
    monkeypatch.setenv("IO_TEST_FLOAT", raw)

    with pytest.raises(ImproperlyConfigured, match=f"IO_TEST_FLOAT {message}"):
        env_float("IO_TEST_FLOAT", 0.3, minimum=0.05)


def test_a_heartbeat_interval_an_agent_would_go_offline_between_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update(DEBUG="true", AGENT_OFFLINE_AFTER_SECONDS="6", EAP_HEARTBEAT_INTERVAL_SECONDS="6")

    refused = subprocess.run(
        [sys.executable, "-c", "import orchestrator_project.settings"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert refused.returncode != 0
    assert "EAP_HEARTBEAT_INTERVAL_SECONDS (6) must be below AGENT_OFFLINE_AFTER_SECONDS (6)" in refused.stderr


def test_the_admin_shows_an_external_agent_without_its_secrets(admin_client, operator):
    registered = register(operator, name="ext-push", mode="push", endpoint_url="http://127.0.0.1:9/")
    agent = Agent.objects.get(pk=registered["agent_id"])
    offer(running_task())

    page = admin_client.get(f"/admin/agents/agent/{agent.pk}/change/")
    deliveries = admin_client.get("/admin/agents/eapdelivery/")

    assert page.status_code == 200
    text = page.content.decode()
    assert "http://127.0.0.1:9/" in text and agent.token_prefix in text
    assert registered["signing_secret"] not in text and agent.token_hash not in text
    assert deliveries.status_code == 200
    assert "offered" in deliveries.content.decode()


# Tenancy: an external agent serves the tenant whose operator registered it, and no other.


def test_an_agent_never_claims_another_tenants_task_nor_is_offered_one(operator):
    theirs = member_client("globex", "gary", role=Membership.Role.OPERATOR)
    outsider = register(theirs, name="globex-pull")
    ours = register(operator, name="acme-pull")
    delivery = offer(running_task())  # an acme task

    assert as_agent(outsider["token"]).get(NEXT).status_code == 204
    assert list(eap.live_external_agents("documentation", delivery.task.session_id)) == [
        Agent.objects.get(name="acme-pull")
    ]
    claimed = as_agent(ours["token"]).get(NEXT)
    assert claimed.status_code == 200 and claimed.json()["task_id"] == str(delivery.task_id)


def test_an_operator_of_several_tenants_names_the_one_the_agent_serves(db):
    client = member_client("acme", "olga", role=Membership.Role.OPERATOR)
    member_client("globex", "olga", role=Membership.Role.ADMIN)
    body = {"name": "ext", "capabilities": ["testing"], "mode": "pull"}

    error = error_of(client.post(REGISTER, body, format="json"), 400)
    assert error["details"]["tenant"] == ["you operate several tenants: name the one this agent serves"]
    denied = error_of(client.post(REGISTER, {**body, "tenant": "initech"}, format="json"), 403)
    assert "not an operator or admin of tenant 'initech'" in denied["message"]
    assert not Agent.objects.exists()

    registered = register(client, name="ext", tenant="globex")
    assert Agent.objects.get(pk=registered["agent_id"]).tenant.slug == "globex"


def test_the_agents_list_shows_workers_and_only_the_callers_own_external_agents(operator):
    register(member_client("globex", "gary", role=Membership.Role.OPERATOR), name="globex-pull")
    register(operator, name="acme-pull")
    Agent.objects.create(name="worker", capabilities=["testing"], executor="scripted")

    names = {a["name"] for a in operator.get("/api/v1/agents/").json()["results"]}

    assert names == {"worker", "acme-pull"}
