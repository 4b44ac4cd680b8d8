"""Throttles (api/throttling.py) and the login lockout (django-axes): per user, per tenant,
failed authentication per client address (NUM_PROXIES honoured), in the API and the event
stream, and the admin's and the console's logins locked after repeated failures.

The throttles count in fixed windows of the shared cache (Redis, flushed before each test); the
throttles' clock is pinned (`clock`), so that no test straddles a window by chance."""

import datetime
import json
import threading

import httpx
import pytest
from axes.models import AccessAttempt, AccessLog
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.utils import timezone

from api.throttling import WindowThrottle, client_address
from sessions.models import Session
from tests.conftest import Stack, error_of, member_client, member_token

SESSIONS = "/api/v1/sessions/"
HEARTBEAT = "/api/v1/eap/heartbeat/"
WINDOW_START = 60 * 28_000_000  # a minute's (and an hour's) first second


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> list[float]:
    """The throttles' time: 15 s into a window unless a test moves it."""
    now = [WINDOW_START + 15.0]
    monkeypatch.setattr(WindowThrottle, "timer", lambda self: now[0])
    return now


@pytest.fixture
def rates(settings):
    """Sets throttle rates (and NUM_PROXIES) for one test; the others stay out of the way."""

    def set_rates(num_proxies: int = 0, **scopes: str) -> None:
        rates = {"user": "1000/min", "tenant": "1000/min", "auth_failures": "1000/min", **scopes}
        settings.REST_FRAMEWORK = {
            **settings.REST_FRAMEWORK,
            "DEFAULT_THROTTLE_RATES": rates,
            "NUM_PROXIES": num_proxies,
        }

    return set_rates


def assert_throttled(response, retry_after: str | None = None) -> dict:
    error = error_of(response, 429)
    assert error["code"] == "throttled"
    assert response["Retry-After"] == (retry_after or response["Retry-After"])
    assert int(response["Retry-After"]) >= 1
    return error


def bad_token_client(address: str = "127.0.0.1", **extra) -> Client:
    return Client(REMOTE_ADDR=address, HTTP_AUTHORIZATION="Token " + "0" * 40, **extra)


# Per user and per tenant


def test_a_user_over_the_user_rate_gets_429_with_retry_after(db, rates):
    rates(user="3/min")
    alice = member_client("acme", "alice")
    bob = member_client("globex", "bob")

    for _ in range(3):
        assert alice.get(SESSIONS).status_code == 200
    refused = alice.get(SESSIONS)

    assert_throttled(refused, retry_after="45")  # the window's 45 seconds left
    assert bob.get(SESSIONS).status_code == 200  # another user's budget is their own


def test_the_user_budget_is_back_in_the_next_window(db, rates, clock):
    rates(user="1/min")
    alice = member_client("acme", "alice")
    assert alice.get(SESSIONS).status_code == 200
    assert_throttled(alice.get(SESSIONS))

    clock[0] += 45  # the next minute

    assert alice.get(SESSIONS).status_code == 200


def test_members_of_one_tenant_share_the_tenant_budget(db, rates):
    rates(tenant="4/min")
    alice = member_client("acme", "alice")
    bob = member_client("acme", "bob")
    carol = member_client("globex", "carol")

    for client in (alice, bob, alice, bob):
        assert client.get(SESSIONS).status_code == 200

    assert_throttled(bob.get(SESSIONS))
    assert_throttled(alice.get(SESSIONS))
    assert carol.get(SESSIONS).status_code == 200  # another tenant's budget


def test_a_member_of_two_tenants_spends_both_budgets(db, rates):
    rates(tenant="2/min")
    both = member_client("acme", "dave")
    member_token("globex", "dave")  # dave joins globex too
    carol = member_client("globex", "carol")

    assert both.get(SESSIONS).status_code == 200
    assert carol.get(SESSIONS).status_code == 200

    assert_throttled(both.get(SESSIONS))  # globex's two are spent
    assert_throttled(carol.get(SESSIONS))


def test_the_tenant_throttle_applies_to_writes_too_and_writes_nothing_when_refused(db, rates):
    rates(tenant="1/min")
    alice = member_client("acme", "alice")
    body = {"requirements": "Fix the crash"}
    assert alice.post(SESSIONS, body, format="json").status_code == 201

    assert_throttled(alice.post(SESSIONS, body, format="json"))
    assert Session.objects.count() == 1


def test_concurrent_requests_never_pass_more_than_the_rate(transactional_db, rates):
    # Twenty requests of one user at once, each in a thread of its own (as gunicorn's threads or
    # processes would serve them) against a budget of five: the count is one atomic increment.
    rates(user="5/min")
    token = member_token("acme", "alice")
    start = threading.Barrier(20)
    statuses = []

    def one_request():
        start.wait()
        try:
            statuses.append(Client(HTTP_AUTHORIZATION=f"Token {token}").get(SESSIONS).status_code)
        finally:
            connection.close()

    threads = [threading.Thread(target=one_request) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(statuses) == [200] * 5 + [429] * 15


# Failed authentication per client address


def test_bad_tokens_from_one_address_are_refused_before_authentication_once_over_budget(db, rates):
    rates(auth_failures="3/min")
    good = member_token("acme", "alice")
    guesser = bad_token_client()
    for _ in range(3):
        assert error_of(guesser.get(SESSIONS), 401)["code"] == "authentication_failed"

    assert_throttled(guesser.get(SESSIONS), retry_after="45")
    # Over its budget, the address gets 429 for any credentials, a valid token's too: answering
    # it would tell a guesser which guess was right.
    assert_throttled(Client(HTTP_AUTHORIZATION=f"Token {good}").get(SESSIONS))
    # Another address is not concerned.
    assert Client(REMOTE_ADDR="10.0.0.2", HTTP_AUTHORIZATION=f"Token {good}").get(SESSIONS).status_code == 200


def test_the_address_may_try_again_in_the_next_window(db, rates, clock):
    rates(auth_failures="1/min")
    good = member_token("acme", "alice")
    error_of(bad_token_client().get(SESSIONS), 401)
    assert_throttled(Client(HTTP_AUTHORIZATION=f"Token {good}").get(SESSIONS))

    clock[0] += 45

    assert Client(HTTP_AUTHORIZATION=f"Token {good}").get(SESSIONS).status_code == 200


def test_requests_that_authenticate_do_not_count_as_failures(db, rates):
    rates(auth_failures="2/min")
    alice = Client(HTTP_AUTHORIZATION=f"Token {member_token('acme', 'alice')}")

    for _ in range(5):
        assert alice.get(SESSIONS).status_code == 200


def test_requests_without_credentials_are_neither_counted_nor_refused(db, rates):
    rates(auth_failures="2/min")
    anonymous = Client()
    for _ in range(5):
        assert error_of(anonymous.get(SESSIONS), 401)["code"] == "not_authenticated"

    assert Client(HTTP_AUTHORIZATION=f"Token {member_token('acme', 'alice')}").get(SESSIONS).status_code == 200


def test_bad_agent_tokens_count_against_the_address_too(db, rates):
    rates(auth_failures="2/min")
    agent = Client(HTTP_X_AGENT_TOKEN="eap_not-a-token")
    for _ in range(2):
        error_of(agent.post(HEARTBEAT, {}, content_type="application/json"), 401)

    assert_throttled(agent.post(HEARTBEAT, {}, content_type="application/json"))
    assert_throttled(bad_token_client().get(SESSIONS))  # one budget per address, whatever the header


def test_x_forwarded_for_is_ignored_without_proxies(db, rates):
    rates(auth_failures="2/min", num_proxies=0)
    for forged in ("1.1.1.1", "2.2.2.2"):  # a guesser claiming a new address each time
        error_of(bad_token_client(HTTP_X_FORWARDED_FOR=forged).get(SESSIONS), 401)

    assert_throttled(bad_token_client(HTTP_X_FORWARDED_FOR="3.3.3.3").get(SESSIONS))


def test_x_forwarded_for_names_the_client_behind_one_proxy(db, rates):
    rates(auth_failures="2/min", num_proxies=1)
    good = member_token("acme", "alice")
    # The proxy (REMOTE_ADDR 10.0.0.1) appends the address it saw: the last one is trusted, what
    # the client put before it is not.
    for _ in range(2):
        error_of(bad_token_client("10.0.0.1", HTTP_X_FORWARDED_FOR="6.6.6.6, 1.1.1.1").get(SESSIONS), 401)

    assert_throttled(bad_token_client("10.0.0.1", HTTP_X_FORWARDED_FOR="7.7.7.7, 1.1.1.1").get(SESSIONS))
    neighbour = Client(REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="2.2.2.2", HTTP_AUTHORIZATION=f"Token {good}")
    assert neighbour.get(SESSIONS).status_code == 200


@pytest.mark.parametrize(
    ("num_proxies", "forwarded", "address"),
    [
        (0, "1.1.1.1", "127.0.0.1"),
        (1, None, "127.0.0.1"),
        (1, "1.1.1.1", "1.1.1.1"),
        (1, "9.9.9.9, 1.1.1.1", "1.1.1.1"),
        (2, "9.9.9.9, 1.1.1.1", "9.9.9.9"),
        (1, "2001:DB8::1", "2001:db8::1"),
        (1, "not an address", None),
    ],
)
def test_client_address_honours_num_proxies(rates, rf, num_proxies, forwarded, address):
    rates(num_proxies=num_proxies)
    headers = {"HTTP_X_FORWARDED_FOR": forwarded} if forwarded else {}

    assert client_address(rf.get("/", REMOTE_ADDR="127.0.0.1", **headers)) == address


def test_the_event_stream_counts_and_refuses_bad_tokens_as_the_api_does(transactional_db):
    good = member_token("acme", "alice")
    stack = Stack(env={"API_THROTTLE_AUTH_FAILURES": "2/day"})  # a day: no window ends mid-test
    try:
        url = f"{stack.stream()}/api/v1/stream/"
        for _ in range(2):
            assert error_of(httpx.get(url, headers={"Authorization": "Token nope"}), 401)["code"] == "not_authenticated"

        refused = httpx.get(url, headers={"Authorization": f"Token {good}"})
        assert refused.status_code == 429
        assert json.loads(refused.content)["error"]["code"] == "throttled"
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        stack.stop()


# Login lockout (django-axes)


@pytest.fixture
def root(db):
    return get_user_model().objects.create_superuser("root", "root@example.com", "right-password-1")


def log_in(path: str, password: str, address: str = "127.0.0.1"):
    client = Client(REMOTE_ADDR=address)
    response = client.post(path, {"username": "root", "password": password})
    return client, response


LOGINS = ["/admin/login/", "/console/login/"]


@pytest.mark.parametrize("path", LOGINS)
def test_after_the_failure_limit_even_the_right_password_is_refused(root, settings, path):
    settings.AXES_FAILURE_LIMIT = 3
    for _ in range(2):
        assert log_in(path, "wrong")[1].status_code == 200  # the form again, with its error
    assert log_in(path, "wrong")[1].status_code == 429  # the third locks

    client, refused = log_in(path, "right-password-1")

    assert refused.status_code == 429
    assert "Too many failed logins" in refused.content.decode()
    assert "locked out for 15 minutes" in refused.content.decode()
    assert "_auth_user_id" not in client.session


@pytest.mark.parametrize("path", LOGINS)
def test_the_lockout_is_per_username_and_address(root, settings, path):
    settings.AXES_FAILURE_LIMIT = 2
    for _ in range(2):
        log_in(path, "wrong")

    _, elsewhere = log_in(path, "right-password-1", address="10.0.0.9")

    assert elsewhere.status_code == 302


def test_axes_reset_lifts_the_lockout(root, settings):
    settings.AXES_FAILURE_LIMIT = 2
    for _ in range(2):
        log_in("/admin/login/", "wrong")
    assert log_in("/admin/login/", "right-password-1")[1].status_code == 429

    call_command("axes_reset_username", "root")

    client, response = log_in("/admin/login/", "right-password-1")
    assert response.status_code == 302
    assert client.session["_auth_user_id"] == str(root.pk)


def test_the_lockout_ends_after_the_cool_off(root, settings):
    settings.AXES_FAILURE_LIMIT = 2
    for _ in range(2):
        log_in("/console/login/", "wrong")
    assert log_in("/console/login/", "right-password-1")[1].status_code == 429

    # The attempts as they will be when the cool-off has passed.
    past = timezone.now() - settings.AXES_COOLOFF_TIME - datetime.timedelta(seconds=1)
    AccessAttempt.objects.update(attempt_time=past)

    assert log_in("/console/login/", "right-password-1")[1].status_code == 302


def test_a_successful_login_resets_the_failures(root, settings):
    settings.AXES_FAILURE_LIMIT = 3
    for _ in range(2):
        log_in("/admin/login/", "wrong")
    assert log_in("/admin/login/", "right-password-1")[1].status_code == 302

    for _ in range(2):
        assert log_in("/admin/login/", "wrong")[1].status_code == 200  # counting from zero again


def test_a_successful_login_leaves_no_record_of_the_address(root):
    assert log_in("/console/login/", "right-password-1")[1].status_code == 302

    assert AccessLog.objects.count() == 0
    assert AccessAttempt.objects.count() == 0
