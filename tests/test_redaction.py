"""The one redaction function (orchestrator_project/redaction.py): what reaches a log line, a
console page or an event stream."""

import pytest
from django.conf import settings

from agents.executors import TaskFailed, TransientError
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


# Redaction at write time (docs/DATA.md): what an agent wrote is stored redacted.

GITHUB_TOKEN = "ghp_" + "W" * 36
DB_PASSWORD = "pw-never-stored-7781"  # pragma: allowlist secret
AWS_KEY = "AKIA" + "Q" * 16


class LeakyExecutor:
    """An agent that prints secrets in its output, its diff and its error (what a test run or a
    tool may print); `fail`: as a business failure, `transient`: as an error to retry."""

    kind = "leaky"

    def __init__(self, how: str):
        self.how = how

    def execute(self, ctx):
        result = {
            "output": f"pushed with {GITHUB_TOKEN}",
            "diff": [{"file": ".env", "patch": f"+DATABASE_URL=postgres://app:{DB_PASSWORD}@db/app"}],
            "artifacts": [{"path": "creds.txt", "aws": AWS_KEY}],
        }
        if self.how == "fail":
            raise TaskFailed(f"tests failed: export password={DB_PASSWORD}; key {AWS_KEY}", result=result)
        if self.how == "transient":
            raise TransientError(f"cannot reach postgres://app:{DB_PASSWORD}@db/app")
        return result


def assert_stored_nowhere(*secrets: str) -> None:
    from tests.test_data_lifecycle import text_columns_holding

    for secret in secrets:
        assert text_columns_holding(secret) == {}, secret


@pytest.mark.parametrize("how", ["complete", "fail", "transient"])
def test_an_agents_output_diff_and_error_reach_the_database_redacted(db, how):
    from tasks.models import Task
    from tasks.running import RetryTask, execute_task
    from tests.test_execution import make_session, runtime

    session = make_session({"a": []})
    session.tasks.update(status="queued")
    task = session.tasks.get()

    if how == "transient":
        with pytest.raises(RetryTask):
            execute_task(task_id=task.pk, runtime=runtime(LeakyExecutor(how)))
    else:
        execute_task(task_id=task.pk, runtime=runtime(LeakyExecutor(how)))

    task = Task.objects.get(pk=task.pk)
    assert task.status == {"complete": "completed", "fail": "failed", "transient": "queued"}[how]
    if how != "transient":
        assert task.result["output"] == f"pushed with {REDACTED}"
        assert task.result["diff"][0]["patch"] == f"+DATABASE_URL=postgres://app:{REDACTED}@db/app"
    if how != "complete":
        assert REDACTED in task.error
    assert_stored_nowhere(GITHUB_TOKEN, DB_PASSWORD, AWS_KEY)


def test_the_scripted_agents_output_is_stored_redacted(db):
    from tasks.models import Task
    from tasks.running import execute_task
    from tests.test_execution import make_session, runtime

    session = make_session({"a": []})
    session.tasks.update(status="queued", params={"output": f"token: {GITHUB_TOKEN}"})

    assert execute_task(task_id=session.tasks.get().pk, runtime=runtime()) == "completed"

    assert Task.objects.get(session=session).result["output"] == f"token: {REDACTED}"
    # Only where the client wrote it itself (what it asked the simulator to print).
    from tests.test_data_lifecycle import text_columns_holding

    assert set(text_columns_holding(GITHUB_TOKEN)) == {"tasks_task.params"}


def test_the_sessions_final_diff_is_stored_redacted(db, tmp_path, settings):
    from sessions.models import Session
    from sessions.workspaces import prepare_workspace
    from tasks.lifecycle import settle_session
    from tests.conftest import commit_repository
    from tests.test_data_lifecycle import make_session

    settings.WORKSPACE_ROOT = tmp_path / "workspaces"
    settings.REPOSITORY_ROOTS = [str(tmp_path)]
    repo = commit_repository(tmp_path / "repo", {"app.py": "print('hi')\n"})
    session = make_session("acme", repository=str(repo), status="running")
    session.tasks.update(status="completed")
    path = prepare_workspace(session)
    (path / "deploy.sh").write_text(f"export GITHUB_TOKEN={GITHUB_TOKEN}\ncurl -H 'Authorization: Bearer {AWS_KEY}'\n")

    assert settle_session(session.pk) == "completed"

    diff = Session.objects.get(pk=session.pk).result["workspace"]["diff"]
    assert "+export GITHUB_TOKEN=[redacted]" in diff and "deploy.sh" in diff
    assert_stored_nowhere(GITHUB_TOKEN, AWS_KEY)


def test_an_external_agents_reported_result_is_stored_redacted(db):
    from agents.models import EapDelivery
    from tenants.models import Membership
    from tests.conftest import member_client
    from tests.test_eap import as_agent, claimed_by, register, result_url

    operator = member_client("acme", "olga", role=Membership.Role.OPERATOR)
    registered = register(operator)
    delivery = claimed_by(registered["token"])
    report = {"status": "failed", "output": f"leaked {GITHUB_TOKEN}", "error": f"password={DB_PASSWORD}"}

    response = as_agent(registered["token"]).post(result_url(delivery.task_id), report, format="json")

    assert response.status_code == 200, response.content
    delivery = EapDelivery.objects.get(pk=delivery.pk)
    assert delivery.result["output"] == f"leaked {REDACTED}" and delivery.error == f"password={REDACTED}"
    assert_stored_nowhere(GITHUB_TOKEN, DB_PASSWORD)
