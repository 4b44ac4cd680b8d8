"""The one redaction function (orchestrator_project/redaction.py): what reaches a log line, a
console page or an event stream."""

import pytest
from django.conf import settings

from orchestrator_project.redaction import REDACTED, Redactor, redact, redact_data


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        ("postgres://app:s3cret-pw@db:5432/orch", "postgres://app:", "s3cret-pw"),
        ("amqp://guest:broker-pw-1@mq//", "amqp://guest:", "broker-pw-1"),
        ("export DATABASE_PASSWORD=hunter2-abc", "DATABASE_PASSWORD=", "hunter2-abc"),
        ('{"api_key": "k-123456789"}', '"api_key": "', "k-123456789"),
        ("password: correct-horse", "password: ", "correct-horse"),
        ("Authorization: Bearer abcdefghijklmnopqrstuvwxyz", "Authorization: Bearer ", "abcdefghijklmnop"),
        ("authorization=Basic dXNlcjpwYXNzd29yZA==", "authorization=Basic ", "dXNlcjpwYXNzd29yZA"),
        ("Authorization: Token eap_0123456789ab_secretpart-xyz", "eap_0123456789ab_", "secretpart-xyz"),
        ("push ghp_abcdefghijklmnopqrstuvwxyz0123 to origin", "push ", "ghp_abcdefghijklmnop"),
        ("aws AKIAABCDEFGHIJKLMNOP here", "aws ", "AKIAABCDEFGHIJKLMNOP"),
        ("model key sk-proj-abcdefghijklmnopqrstu", "model key ", "sk-proj-abcdefghijklmnopqrstu"),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N", "jwt ", "eyJhbGci"),
        (
            "key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----\ndone",
            "done",
            "b3BlbnNzaC1rZXk",
        ),
    ],
)
def test_credentials_of_every_known_shape_are_removed(text, kept, gone):
    redacted = redact(text)
    assert gone not in redacted and kept in redacted and REDACTED in redacted


def test_our_own_secrets_go_by_value_in_any_encoding():
    redactor = Redactor(["s3cr3t/with spaces"])
    for form in ("s3cr3t/with spaces", "s3cr3t%2Fwith%20spaces"):
        assert redactor(f"value={form}!") != f"value={form}!" and form not in redactor(f"x {form} y")
    assert settings.SECRET_KEY not in redact(f"the key is {settings.SECRET_KEY}")


def test_ordinary_text_is_left_alone():
    for text in ("the token bucket refills every second", "3 passed, 1 failed in 0.2s", "git push origin main", ""):
        assert redact(text) == text


def test_json_values_under_secret_names_go_whatever_they_look_like():
    data = {"output": "ok", "password": "x1", "nested": [{"client_secret": "abc"}, "Bearer abcdefghijklmnopqrstuv"]}
    assert redact_data(data) == {
        "output": "ok",
        "password": REDACTED,
        "nested": [{"client_secret": REDACTED}, f"Bearer {REDACTED}"],
    }


@pytest.mark.parametrize(
    "hostile",
    ["a-" * 500_000, "a." * 500_000, "x://" * 250_000, "a:" * 500_000, "token " * 170_000, "://" + "a" * 1_000_000,
     "password" * 125_000, "Authorization: " * 70_000, "bearer " + "a" * 1_000_000, "eyJ" * 330_000],
)  # fmt: skip
def test_a_megabyte_of_hostile_output_is_redacted_in_one_pass(hostile):
    """Every pattern starts with a literal, so the work grows with the text, not its square: a
    pattern that scanned to the end from every position would take hours here (and the suite's
    per-test timeout would fail this test with a traceback)."""
    assert redact(f"{hostile} password=hunter2-at-the-end").endswith(" password=[redacted]")
