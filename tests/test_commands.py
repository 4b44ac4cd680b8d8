"""The operator commands: bootstrap_tenant hands out and rotates tokens; run_agent refuses bad arguments
before it registers an agent or starts a worker."""

from datetime import timedelta
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.utils import timezone
from knox.crypto import hash_token
from rest_framework.test import APIClient

from agents.models import Agent
from tenants.models import Membership, Tenant
from tokens.models import ApiToken


def token_client(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return client


def bootstrap(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("bootstrap_tenant", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_bootstrap_tenant_creates_tenant_user_membership_and_prints_token_last(db):
    out, err = bootstrap("payments-team", "--user", "dana", "--role", "operator")

    token = out.strip().splitlines()[-1]
    user = get_user_model().objects.get(username="dana")
    stored = ApiToken.objects.get(user=user)
    assert token.startswith("io_") and stored.token_key == token[:15]
    assert stored.digest == hash_token(token) and stored.expiry is not None
    assert not user.has_usable_password()
    tenant = Tenant.objects.get(slug="payments-team")
    assert tenant.name == "payments-team"
    assert Membership.objects.get(user=user, tenant=tenant).role == Membership.Role.OPERATOR
    assert "created" in err


def test_bootstrap_tenant_token_authenticates_against_the_api(db):
    from rest_framework.test import APIClient

    out, _ = bootstrap("acme", "--user", "erin")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {out.strip().splitlines()[-1]}")

    assert client.get("/api/v1/sessions/").status_code == 200


def test_bootstrap_tenant_is_idempotent_updates_the_role_and_issues_no_second_token(db):
    first, _ = bootstrap("acme", "--user", "frank", "--role", "developer")
    second, err = bootstrap("acme", "--user", "frank", "--role", "viewer")

    assert first.strip() and second == ""
    assert "--rotate" in err
    assert Tenant.objects.filter(slug="acme").count() == 1
    assert get_user_model().objects.filter(username="frank").count() == 1
    membership = Membership.objects.get(user__username="frank", tenant__slug="acme")
    assert membership.role == Membership.Role.VIEWER
    assert ApiToken.objects.filter(user__username="frank").count() == 1
    assert "existing" in err


def test_bootstrap_tenant_rotate_issues_a_new_token_and_the_old_one_stays_valid(db):
    first = bootstrap("acme", "--user", "fay")[0].strip()
    second = bootstrap("acme", "--user", "fay", "--rotate")[0].strip()

    assert second and second != first
    assert ApiToken.objects.filter(user__username="fay").count() == 2
    for token in (first, second):
        assert token_client(token).get("/api/v1/sessions/").status_code == 200


def test_bootstrap_tenant_rotate_and_revoke_others_leaves_only_the_new_token(db):
    first = bootstrap("acme", "--user", "fred")[0].strip()
    second, err = bootstrap("acme", "--user", "fred", "--rotate", "--revoke-others")

    assert "revoked 1" in err
    assert ApiToken.objects.filter(user__username="fred").count() == 1
    assert token_client(first).get("/api/v1/sessions/").status_code == 401
    assert token_client(second.strip()).get("/api/v1/sessions/").status_code == 200


def test_bootstrap_tenant_issues_a_token_again_once_the_last_one_expired(db):
    bootstrap("acme", "--user", "fern")
    ApiToken.objects.filter(user__username="fern").update(expiry=timezone.now() - timedelta(seconds=1))

    out, _ = bootstrap("acme", "--user", "fern")

    assert token_client(out.strip()).get("/api/v1/sessions/").status_code == 200
    assert ApiToken.objects.filter(user__username="fern").count() == 1  # the expired one went


def test_bootstrap_tenant_refuses_revoke_others_without_rotate(db):
    with pytest.raises(CommandError, match="--rotate"):
        bootstrap("acme", "--user", "finn", "--revoke-others")

    assert not get_user_model().objects.exists()


def test_bootstrap_tenant_adds_an_existing_user_to_a_second_tenant(db):
    first, _ = bootstrap("acme", "--user", "gina")
    second, _ = bootstrap("globex", "--user", "gina", "--role", "admin", "--name", "Globex Corp")

    assert first.strip() and second == ""  # gina's token serves both tenants
    assert Tenant.objects.get(slug="globex").name == "Globex Corp"
    roles = dict(Membership.objects.filter(user__username="gina").values_list("tenant__slug", "role"))
    assert roles == {"acme": "developer", "globex": "admin"}


@pytest.mark.parametrize("slug", ["bad slug", "semi;colon", "dot.ted", ""])
def test_bootstrap_tenant_rejects_a_bad_slug(db, slug):
    with pytest.raises(CommandError, match="slug"):
        bootstrap(slug, "--user", "hank")

    assert not Tenant.objects.exists()
    assert not get_user_model().objects.exists()


def test_bootstrap_tenant_rejects_an_unknown_role(db):
    with pytest.raises(CommandError, match="role"):
        bootstrap("acme", "--user", "ivan", "--role", "boss")

    assert not Tenant.objects.exists()


@pytest.mark.parametrize("user", ["   ", "u" * 151])
def test_bootstrap_tenant_rejects_a_bad_user_name(db, user):
    with pytest.raises(CommandError, match="--user"):
        bootstrap("acme", "--user", user)

    assert not Tenant.objects.exists()
    assert not get_user_model().objects.exists()


def test_bootstrap_tenant_requires_a_user(db):
    with pytest.raises(CommandError, match="--user"):
        bootstrap("acme")


def run_agent(*args: str) -> None:
    call_command("run_agent", *args, stdout=StringIO(), stderr=StringIO())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "a1", "--capabilities", "mind_reading", "--executor", "scripted"], "unknown capabilities"),
        (["--name", "a1", "--capabilities", "testing,telepathy", "--executor", "scripted"], "telepathy"),
        (["--name", "a1", "--capabilities", " , ,", "--executor", "scripted"], "none given"),
        (["--name", "Bad Name", "--capabilities", "testing", "--executor", "scripted"], "--name"),
        (["--name", "-dash", "--capabilities", "testing", "--executor", "scripted"], "--name"),
        (["--name", "a" * 101, "--capabilities", "testing", "--executor", "scripted"], "--name"),
        (["--name", "a1", "--capabilities", "testing", "--executor", "scripted", "--concurrency", "0"], "concurrency"),
        (["--name", "a1", "--capabilities", "testing", "--executor", "scripted", "--concurrency", "65"], "concurrency"),
        (
            ["--name", "a1", "--capabilities", "testing", "--executor", "scripted", "--concurrency", "two"],
            "concurrency",
        ),
        (["--name", "a1", "--capabilities", "testing", "--executor", "scripted", "--fail-rate", "1.5"], "fail-rate"),
        (["--name", "a1", "--capabilities", "testing", "--executor", "scripted", "--duration", "-1"], "duration"),
        (["--name", "a1", "--capabilities", "testing", "--executor", "telepathy"], "executor"),
        (["--capabilities", "testing", "--executor", "scripted"], "--name"),
    ],
    ids=[
        "unknown-capability",
        "one-unknown-among-known",
        "no-capabilities",
        "name-with-space",
        "name-leading-dash",
        "name-too-long",
        "concurrency-zero",
        "concurrency-too-high",
        "concurrency-not-a-number",
        "fail-rate-above-one",
        "negative-duration",
        "unknown-executor",
        "missing-name",
    ],
)
def test_run_agent_rejects_bad_arguments_before_registering(db, args, message):
    with pytest.raises(CommandError, match=message):
        run_agent(*args)

    assert not Agent.objects.exists()


def test_issue_token_prints_a_token_for_an_existing_user_who_needs_no_tenant(db):
    staff = get_user_model().objects.create_user("ops", is_staff=True)
    out = StringIO()

    call_command("issue_token", "ops", "--name", "runbook", stdout=out)

    key = out.getvalue().strip()
    assert ApiToken.objects.get(user=staff).name == "runbook"
    assert token_client(key).get("/api/v1/agents/").status_code == 200


@pytest.mark.parametrize("args, message", [(["ghost"], "no active user"), (["ops", "--name", "x" * 101], "--name")])
def test_issue_token_refuses_an_unknown_user_or_a_long_name(db, args, message):
    get_user_model().objects.create_user("ops")

    with pytest.raises(CommandError, match=message):
        call_command("issue_token", *args, stdout=StringIO())
    assert not ApiToken.objects.exists()
