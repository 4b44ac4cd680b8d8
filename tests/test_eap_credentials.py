"""External agents' credentials: rotation (POST /api/v1/eap/rotate/) with a grace for the
previous token and signing secret, and revocation by the agent's tenant's operators."""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from agents import eap
from agents.executors import TransientError
from agents.executors.eap import EapExecutor
from agents.models import Agent, AgentEvent
from tenants.models import Membership

from .conftest import error_of, member_client, staff_client
from .test_eap import HEARTBEAT, Endpoint, as_agent, context_for, inline, push_agent, register, running_task
from .test_tokens import tables_holding

ROTATE = "/api/v1/eap/rotate/"
BEAT = {"status": "online", "current_load": 0}


def revoke_url(agent_id: int) -> str:
    return f"/api/v1/agents/{agent_id}/revoke-credentials/"


@pytest.fixture
def operator(db) -> APIClient:
    return member_client("acme", "olga", role=Membership.Role.OPERATOR)


@pytest.fixture
def registered(operator) -> dict:
    return register(operator, name="ext-pull")


def beats(token: str) -> int:
    return as_agent(token).post(HEARTBEAT, BEAT, format="json").status_code


def rotate(token: str) -> dict:
    answer = as_agent(token).post(ROTATE)
    assert answer.status_code == 200, answer.content
    return answer.json()


def agent_row_as_text(agent_id: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT row_to_json(a)::text FROM agents_agent a WHERE id = %s", [agent_id])
        return cursor.fetchone()[0]


def test_rotation_returns_a_new_token_and_secret_and_the_old_token_works_in_its_grace(registered, settings):
    settings.EAP_ROTATION_GRACE_SECONDS = 600

    rotated = rotate(registered["token"])

    assert set(rotated) == {"token", "signing_secret", "grace_seconds"} and rotated["grace_seconds"] == 600
    assert rotated["token"] != registered["token"] and rotated["signing_secret"] != registered["signing_secret"]
    assert beats(rotated["token"]) == 204
    assert beats(registered["token"]) == 204
    agent = Agent.objects.get(pk=registered["agent_id"])
    assert timezone.now() < agent.previous_credentials_expire_at <= timezone.now() + timedelta(seconds=600)
    assert tables_holding(rotated["token"]) == [] and tables_holding(registered["token"]) == []  # hashes only
    event = AgentEvent.objects.get(agent=agent)
    assert (event.action, event.actor) == ("rotate", "agent:ext-pull")


def test_the_old_token_is_refused_once_its_grace_has_ended(registered):
    rotated = rotate(registered["token"])
    Agent.objects.filter(pk=registered["agent_id"]).update(
        previous_credentials_expire_at=timezone.now() - timedelta(seconds=1)
    )

    assert error_of(as_agent(registered["token"]).post(HEARTBEAT, BEAT, format="json"), 401)
    assert beats(rotated["token"]) == 204


def test_without_a_grace_the_old_token_is_refused_at_once(registered, settings):
    settings.EAP_ROTATION_GRACE_SECONDS = 0

    rotated = rotate(registered["token"])

    assert beats(registered["token"]) == 401
    assert beats(rotated["token"]) == 204
    agent = Agent.objects.get(pk=registered["agent_id"])
    assert (agent.previous_token_hash, agent.previous_signing_secret) == ("", "")


def test_a_second_rotation_ends_the_first_ones_old_token_at_once(registered):
    first = rotate(registered["token"])
    second = rotate(first["token"])

    assert beats(registered["token"]) == 401
    assert beats(first["token"]) == 204  # now the previous one, in its grace
    assert beats(second["token"]) == 204


def test_the_previous_token_may_not_rotate(registered):
    rotated = rotate(registered["token"])
    before = agent_row_as_text(registered["agent_id"])

    error = error_of(as_agent(registered["token"]).post(ROTATE), 403)

    assert "current token" in error["message"]
    assert agent_row_as_text(registered["agent_id"]) == before
    assert beats(rotated["token"]) == 204


def test_of_two_racing_rotations_with_one_token_the_second_is_refused_and_changes_nothing(registered):
    # Both authenticated with the same current token; the first rotates, the second comes after.
    as_read = Agent.objects.get(pk=registered["agent_id"])
    first = eap.rotate_credentials(Agent.objects.get(pk=registered["agent_id"]))
    before = agent_row_as_text(registered["agent_id"])

    with pytest.raises(eap.StaleCredentials):
        eap.rotate_credentials(as_read)

    assert agent_row_as_text(registered["agent_id"]) == before
    assert beats(first["token"]) == 204 and beats(registered["token"]) == 204  # new, and old in grace


@pytest.mark.parametrize("token", [None, "", "eap_nope_nope", "eap__x", "x" * 5000])
def test_rotate_without_a_valid_agent_token_is_401_and_changes_nothing(registered, token):
    client = APIClient()
    if token is not None:
        client.credentials(HTTP_X_AGENT_TOKEN=token)
    before = agent_row_as_text(registered["agent_id"])

    error_of(client.post(ROTATE), 401)

    assert agent_row_as_text(registered["agent_id"]) == before


def test_an_operators_api_token_cannot_rotate_an_agent(operator, registered):
    error_of(operator.post(ROTATE), 401)


@pytest.fixture
def endpoint():
    running = Endpoint()
    yield running
    running.close()


@pytest.fixture
def gateway_operator(transactional_db, settings) -> APIClient:
    settings.EAP_PUSH_TIMEOUT_SECONDS = 0.3
    settings.EAP_PUSH_RETRIES = 1
    settings.EAP_POLL_INTERVAL_SECONDS = 0.05
    return member_client("acme", "olga", role=Membership.Role.OPERATOR)


def test_in_grace_a_push_is_signed_with_the_new_secret_and_the_previous_one(gateway_operator, endpoint):
    agent, registered = push_agent(gateway_operator, endpoint.url)
    endpoint.reply = inline({"status": "completed", "output": "done"})
    rotated = rotate(registered["token"])

    EapExecutor().execute(context_for(running_task(key="in-grace")))
    Agent.objects.filter(pk=agent.pk).update(previous_credentials_expire_at=timezone.now() - timedelta(seconds=1))
    EapExecutor().execute(context_for(running_task(key="after-grace")))

    (in_grace, body), (after, later_body) = endpoint.requests
    stamp = in_grace["X-EAP-Timestamp"]
    assert in_grace["X-EAP-Signature"] == eap.sign(rotated["signing_secret"], stamp, body)
    assert in_grace["X-EAP-Signature-Previous"] == eap.sign(registered["signing_secret"], stamp, body)
    assert after["X-EAP-Signature"] == eap.sign(rotated["signing_secret"], after["X-EAP-Timestamp"], later_body)
    assert "X-EAP-Signature-Previous" not in after


def test_an_operator_revokes_an_agents_credentials_current_and_previous_at_once(operator, registered):
    rotated = rotate(registered["token"])

    answer = operator.post(revoke_url(registered["agent_id"]))

    assert answer.status_code == 200 and answer.json()["status"] == "offline"
    assert beats(rotated["token"]) == 401
    assert beats(registered["token"]) == 401
    agent = Agent.objects.get(pk=registered["agent_id"])
    assert agent.credentials_revoked_at is not None
    assert (agent.token_hash, agent.signing_secret, agent.previous_token_hash, agent.previous_signing_secret) == (
        "",
        "",
        "",
        "",
    )
    event = AgentEvent.objects.filter(agent=agent).latest("id")
    assert (event.action, event.actor, event.to_status) == ("revoke", "user:olga", "offline")


def test_a_revoked_push_agent_is_handed_no_task(gateway_operator, endpoint):
    agent, _ = push_agent(gateway_operator, endpoint.url)
    assert gateway_operator.post(revoke_url(agent.pk)).status_code == 200
    Agent.objects.filter(pk=agent.pk).update(status="online", last_heartbeat=timezone.now())  # a stray update

    with pytest.raises(TransientError):
        EapExecutor().execute(context_for(running_task()))
    assert endpoint.requests == []


@pytest.mark.parametrize("role", [Membership.Role.DEVELOPER, Membership.Role.VIEWER])
def test_a_developer_or_viewer_may_not_revoke_and_the_agent_keeps_its_credentials(registered, role):
    client = member_client("acme", "dev", role=role)

    error_of(client.post(revoke_url(registered["agent_id"])), 403)

    assert beats(registered["token"]) == 204
    assert not AgentEvent.objects.filter(action="revoke").exists()


def test_another_tenants_operator_gets_a_404_and_the_agent_keeps_its_credentials(registered):
    stranger = member_client("globex", "gus", role=Membership.Role.OPERATOR)

    error_of(stranger.post(revoke_url(registered["agent_id"])), 404)

    assert beats(registered["token"]) == 204


def test_revoking_an_unknown_agent_is_a_404(operator):
    error_of(operator.post(revoke_url(999999)), 404)


def test_a_platform_worker_has_no_credentials_to_revoke(db):
    worker = Agent.objects.create(name="w1", capabilities=["testing"], status="online")

    error = error_of(staff_client().post(revoke_url(worker.pk)), 409)

    assert "platform worker" in error["message"]
    assert Agent.objects.get(pk=worker.pk).status == "online"


def test_the_admin_action_revokes_an_external_agents_credentials(admin_client, registered):
    admin_client.post(
        "/admin/agents/agent/", {"action": "revoke_agent_credentials", "_selected_action": [registered["agent_id"]]}
    )

    assert beats(registered["token"]) == 401
    event = AgentEvent.objects.get(action="revoke")
    assert event.actor.startswith("admin:")


def test_the_admin_never_shows_the_previous_secrets(admin_client, registered):
    rotate(registered["token"])
    agent = Agent.objects.get(pk=registered["agent_id"])

    text = admin_client.get(f"/admin/agents/agent/{agent.pk}/change/").content.decode()

    assert agent.previous_token_hash not in text and agent.previous_signing_secret not in text
    assert agent.signing_secret not in text and registered["signing_secret"] not in text


def reference_agent():
    """examples/eap_agent.py, loaded from its file (it is a script, not a package module)."""
    import importlib.util

    from .conftest import ROOT

    spec = importlib.util.spec_from_file_location("eap_agent", ROOT / "examples" / "eap_agent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_agent_accepts_a_push_in_grace_by_either_signature_and_nothing_else():
    agent = reference_agent()
    body, stamp, now = b'{"task_id": "t"}', "1700000000", 1700000000.0
    old, new = "old-secret", "new-secret"
    signed = {"signature": eap.sign(new, stamp, body), "previous_signature": eap.sign(old, stamp, body)}

    assert agent.signature_problem(new, stamp, body, now=now, **signed) is None
    assert agent.signature_problem(old, stamp, body, now=now, **signed) is None  # a replica not yet updated
    assert agent.signature_problem("stolen?", stamp, body, now=now, **signed) == "bad X-EAP-Signature"
    assert agent.signature_problem(old, stamp, body, eap.sign(new, stamp, body), now) == "bad X-EAP-Signature"
