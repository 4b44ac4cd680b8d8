"""The data lifecycle (docs/DATA.md): a tenant's export (API and command), the erasure of a
person, the deletion of a tenant with its workspaces and branches, and retention of sessions
abandoned in pending or paused. On the real database, Redis and git."""

import json
import subprocess
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from axes.models import AccessAttempt
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.core.management import CommandError, ManagementUtility, call_command
from django.db import connection
from django.test import Client
from django.utils import timezone
from psycopg import sql
from rest_framework.test import APIClient

from agents.models import Agent, AgentEvent, EapDelivery
from agents.services import drain_agent
from sessions.models import Checkpoint, FeedEvent, Session, SessionEvent
from sessions.workspaces import finish_workspace, prepare_workspace, workspace_of
from tasks.models import Task
from tasks.sweeps import delete_abandoned_sessions
from tasks.tenancy import pseudonym
from tenants.models import Membership, Tenant
from tests.conftest import commit_repository, error_of, member_client
from tokens.models import ApiToken

pytestmark = pytest.mark.django_db

EXPORT = "/api/v1/tenant/export/"


def make_session(slug: str, title: str = "t", *, status: str = "pending", keys=("a",), **fields) -> Session:
    tenant, _ = Tenant.objects.get_or_create(slug=slug, defaults={"name": slug})
    session = Session.objects.create(tenant=tenant, title=title, requirements=f"{title} requirements", **fields)
    Session.objects.filter(pk=session.pk).update(status=status)
    previous = None
    for i, key in enumerate(keys):
        task = Task.objects.create(session=session, key=key, title=f"{title} {key}", capability="testing", position=i)
        if previous is not None:
            task.depends_on.set([previous])
        previous = task
    session.refresh_from_db()
    return session


def lines_of(response) -> list[dict]:
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/x-ndjson"
    assert response.streaming
    text = b"".join(response.streaming_content).decode()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def filled(db):
    """Tenant acme with an admin (ada), a session of two tasks with an event, a checkpoint and
    an external agent's delivery; tenant globex with a session of its own."""
    admin = member_client("acme", "ada", Membership.Role.ADMIN)
    session = make_session("acme", "acme work", keys=("design", "build"), metadata={"ticket": "PAY-1"})
    session.transition("queued", reason="started", actor="user:ada")
    design = session.tasks.get(key="design")
    Task.objects.filter(pk=design.pk).update(status="completed", result={"output": "designed"}, error="")
    Checkpoint.objects.create(session=session, task=design)
    agent = Agent.objects.create(name="ext", executor="eap", mode="external", tenant=session.tenant)
    EapDelivery.objects.create(
        task=design, attempt=1, agent=agent, state="done", result={"status": "completed"}, deadline=timezone.now()
    )
    other = make_session("globex", "globex secret plan")
    other.transition("queued", reason="started", actor="user:gus")
    return {"admin": admin, "session": session, "other": other}


def test_an_admin_exports_every_kind_of_row_of_its_tenant_and_nothing_of_another(filled):
    session = filled["session"]

    lines = lines_of(filled["admin"].get(EXPORT))

    by_type = {}
    for line in lines:
        by_type.setdefault(line["type"], []).append(line)
    assert lines[0]["type"] == "tenant" and lines[0]["slug"] == "acme"
    assert set(by_type) == {"tenant", "member", "session", "task", "event", "checkpoint", "eap_delivery"}
    assert [(m["username"], m["role"]) for m in by_type["member"]] == [("ada", "admin")]
    [exported] = by_type["session"]
    assert (exported["id"], exported["title"], exported["status"]) == (str(session.pk), "acme work", "queued")
    assert exported["metadata"] == {"ticket": "PAY-1"}
    tasks = {t["key"]: t for t in by_type["task"]}
    assert tasks["design"]["result"] == {"output": "designed"} and tasks["design"]["status"] == "completed"
    assert tasks["build"]["depends_on"] == ["design"] and tasks["design"]["depends_on"] == []
    assert [(e["to_status"], e["actor"]) for e in by_type["event"]] == [("queued", "user:ada")]
    assert [c["task_key"] for c in by_type["checkpoint"]] == ["design"]
    assert [(d["agent"], d["state"]) for d in by_type["eap_delivery"]] == [("ext", "done")]
    everything = json.dumps(lines)
    assert "globex" not in everything and "gus" not in everything


def test_the_export_is_streamed_and_redacts_what_agents_wrote_before_write_time_redaction(filled):
    Task.objects.filter(session=filled["session"], key="build").update(error="boom: password=hunter2-old-row")

    response = filled["admin"].get(EXPORT, HTTP_ACCEPT="application/x-ndjson")

    assert not isinstance(response.streaming_content, list | bytes)
    assert response["Content-Disposition"] == 'attachment; filename="acme-export.jsonl"'
    build = next(line for line in lines_of(response) if line["type"] == "task" and line["key"] == "build")
    assert "hunter2-old-row" not in build["error"] and "[redacted]" in build["error"]


def test_the_export_reads_each_table_once_however_many_sessions(filled):
    """Each table is one chunked (server-side cursor) query: no query per session or task."""
    from django.test.utils import CaptureQueriesContext

    def queries_of_export() -> int:
        with CaptureQueriesContext(connection) as queries:
            lines_of(filled["admin"].get(EXPORT))
        return len(queries)

    queries_of_export()  # the token's first use of the minute is noted (tokens/authentication.py)
    few = queries_of_export()
    for i in range(20):
        make_session("acme", f"more {i}", keys=("x", "y", "z")).transition("queued", reason="go", actor="user:ada")

    assert queries_of_export() == few


@pytest.mark.parametrize("role", [Membership.Role.OPERATOR, Membership.Role.DEVELOPER, Membership.Role.VIEWER])
def test_only_an_admin_of_the_tenant_may_export(filled, role):
    client = member_client("acme", f"member-{role}", role)

    error = error_of(client.get(EXPORT), 403)

    assert "only an admin of tenant acme" in error["message"]


def test_export_without_credentials_is_401(filled):
    assert error_of(APIClient().get(EXPORT), 401)["code"] == "not_authenticated"


def test_a_member_of_several_tenants_names_one_and_must_be_its_admin(filled):
    ada = filled["admin"]
    member_client("globex", "ada", Membership.Role.DEVELOPER)  # ada is also a developer of globex

    assert "several tenants" in error_of(ada.get(EXPORT), 400)["message"]
    assert "not a member of tenant 'nowhere'" in error_of(ada.get(EXPORT, {"tenant": "nowhere"}), 400)["message"]
    assert error_of(ada.get(EXPORT, {"tenant": "globex"}), 403)
    lines = lines_of(ada.get(EXPORT, {"tenant": "acme"}))
    assert {line["title"] for line in lines if line["type"] == "session"} == {"acme work"}


@pytest.mark.parametrize("slug", ["a\x00b", "x" * 65, "../acme", "acme work"])
def test_export_refuses_a_tenant_that_is_no_slug_with_a_400(filled, slug):
    error = error_of(filled["admin"].get(EXPORT, {"tenant": slug}), 400)

    assert error["details"] == {"tenant": ["not a tenant slug (letters, digits, '-' and '_', at most 64)"]}


def test_the_export_answers_json_lines_and_json_errors_whatever_the_client_accepts(filled):
    developer = member_client("acme", "dev", Membership.Role.DEVELOPER)

    assert lines_of(filled["admin"].get(EXPORT, HTTP_ACCEPT="text/html"))
    refused = developer.get(EXPORT, HTTP_ACCEPT="application/x-ndjson")
    assert refused["Content-Type"] == "application/json" and error_of(refused, 403)


def test_export_tenant_writes_the_same_lines_as_the_api(filled, tmp_path):
    target = tmp_path / "acme.jsonl"

    call_command("export_tenant", "acme", output=str(target), stderr=StringIO())
    out = StringIO()
    call_command("export_tenant", "acme", stdout=out)

    from_api = lines_of(filled["admin"].get(EXPORT))
    for text in (target.read_text(), out.getvalue()):
        from_command = [json.loads(line) for line in text.splitlines()]
        assert from_command[1:] == from_api[1:]  # the first line says when it was exported
        assert from_command[0]["slug"] == "acme"


def test_export_tenant_refuses_an_unknown_tenant_and_an_unwritable_file(filled, tmp_path):
    with pytest.raises(CommandError, match="there is no tenant 'nowhere'"):
        call_command("export_tenant", "nowhere")
    with pytest.raises(CommandError, match="cannot write"):
        call_command("export_tenant", "acme", output=str(tmp_path / "missing" / "x.jsonl"))


def test_manage_py_exits_non_zero_with_the_message_for_an_unknown_user(capsys):
    with pytest.raises(SystemExit) as exited:
        ManagementUtility(["manage.py", "erase_user", "nobody-of-that-name"]).execute()

    assert exited.value.code == 1
    assert "CommandError: there is no user 'nobody-of-that-name'" in capsys.readouterr().err


# Erasure

NAME = "zelda-erasable"


def text_columns_holding(word: str) -> dict[str, list[str]]:
    """Every text or JSON column of every table that holds `word` somewhere, with those values."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' "
            "AND data_type IN ('text', 'character varying', 'jsonb', 'json', 'ARRAY')"
        )
        columns = cursor.fetchall()
        found = {}
        for table, column in columns:
            query = sql.SQL("SELECT {column}::text FROM {table} WHERE {column}::text LIKE %s").format(
                column=sql.Identifier(column), table=sql.Identifier(table)
            )
            cursor.execute(query, [f"%{word}%"])
            if values := [row[0] for row in cursor.fetchall()]:
                found[f"{table}.{column}"] = values
    return found


def test_erase_user_leaves_a_pseudonym_wherever_the_name_was_and_the_name_nowhere(db):
    zelda = member_client("acme", NAME)
    twin = member_client("acme", f"{NAME}2")  # a name that begins with hers is not hers
    created = zelda.post("/api/v1/sessions/", {"requirements": "r", "title": "hers"}, format="json")
    assert created.status_code == 201, created.content
    session_id = created.json()["id"]
    assert zelda.post(f"/api/v1/sessions/{session_id}/cancel/").status_code == 202
    theirs = twin.post("/api/v1/sessions/", {"requirements": "r", "title": "twin's"}, format="json").json()["id"]
    assert twin.post(f"/api/v1/sessions/{theirs}/cancel/").status_code == 202
    agent = Agent.objects.create(name="worker-1", executor="scripted")
    drain_agent(agent, actor=f"admin:{NAME}", reason="maintenance")
    user = get_user_model().objects.get(username=NAME)
    staff = get_user_model().objects.create_user("staff-member", is_staff=True)
    LogEntry.objects.create(
        user=staff, content_type=ContentType.objects.get_for_model(user), object_id=str(user.pk),
        object_repr=NAME, action_flag=CHANGE, change_message=f"changed {NAME}",
    )  # fmt: skip
    # Two failed logins under her name: the lockout keeps them (django-axes).
    for _ in range(2):
        Client().post("/admin/login/", {"username": NAME, "password": "wrong"})  # pragma: allowlist secret
    assert AccessAttempt.objects.filter(username=NAME).exists()
    alias = pseudonym(user)
    assert text_columns_holding(NAME)  # the test's data does hold the name

    out = StringIO()
    call_command("erase_user", NAME, stdout=out)

    assert f"now {alias}" in out.getvalue()
    # The twin's rows are the only ones left with that prefix.
    left = text_columns_holding(NAME)
    assert all(f"{NAME}2" in value for values in left.values() for value in values), left
    assert not get_user_model().objects.filter(username=NAME).exists()
    assert not Membership.objects.filter(user_id=user.pk).exists() and not ApiToken.objects.filter(user_id=user.pk)
    session = Session.objects.get(pk=session_id)
    assert session.created_by is None and session.status == "cancelled"
    events = SessionEvent.objects.filter(session=session)
    assert set(events.values_list("actor", flat=True)) == {f"user:{alias}"}
    assert events.get().reason == f"cancel by user:{alias}"
    feed = FeedEvent.objects.filter(session=session, kind="session", data__to="cancelled").get()
    assert (feed.data["actor"], feed.data["reason"]) == (f"user:{alias}", f"cancel by user:{alias}")
    assert AgentEvent.objects.get(agent=agent).actor == f"admin:{alias}"
    assert SessionEvent.objects.get(session_id=theirs).actor == f"user:{NAME}2"
    assert LogEntry.objects.get(user=staff).object_repr == alias


def test_the_pseudonym_is_the_same_for_all_of_one_users_rows_and_differs_between_users(db):
    first = get_user_model().objects.create_user("p1")
    second = get_user_model().objects.create_user("p2")
    assert pseudonym(first) == pseudonym(first) != pseudonym(second)
    assert "p1" not in pseudonym(first)


def test_erase_user_refuses_an_unknown_user_and_changes_nothing(db):
    member_client("acme", "kept-person")
    with pytest.raises(CommandError, match="there is no user 'nobody'"):
        call_command("erase_user", "nobody")
    assert get_user_model().objects.filter(username="kept-person").exists()


# Deleting a tenant


@pytest.fixture
def repo(tmp_path, settings) -> Path:
    settings.WORKSPACE_ROOT = tmp_path / "workspaces"
    settings.REPOSITORY_ROOTS = [str(tmp_path)]
    return commit_repository(tmp_path / "repo", {"app.py": "print('hi')\n"})


def branches(repo: Path) -> set[str]:
    listed = subprocess.run(
        ["git", "branch", "--list", "--format=%(refname:short)", "io/*"],
        cwd=repo, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return set(listed.stdout.split())


def worked_session(slug: str, repo: Path, status: str = "completed") -> Session:
    """A session of `slug` whose workspace was made and finished: its branch is in `repo`."""
    session = make_session(slug, f"{slug} change", repository=str(repo))
    path = prepare_workspace(session)
    (path / "work.txt").write_text("done\n")
    finish_workspace(Session.objects.get(pk=session.pk))
    Session.objects.filter(pk=session.pk).update(status=status, finished_at=timezone.now())
    session.refresh_from_db()
    return session


def test_delete_tenant_removes_its_rows_workspaces_and_branches_and_nothing_of_another(
    repo, django_capture_on_commit_callbacks
):
    member_client("acme", "ada", Membership.Role.ADMIN)
    gone = worked_session("acme", repo)
    gone.note("a note")
    Agent.objects.create(name="acme-ext", executor="eap", mode="external", tenant=gone.tenant)
    kept = worked_session("globex", repo)
    tenant_id = gone.tenant_id
    assert branches(repo) == {gone.branch, kept.branch}

    out = StringIO()
    with django_capture_on_commit_callbacks(execute=True):
        call_command("delete_tenant", "acme", interactive=False, stdout=out, stderr=StringIO())

    assert "tenant acme deleted with 1 session(s)" in out.getvalue()
    assert not Tenant.objects.filter(slug="acme").exists()
    assert not Session.objects.filter(pk=gone.pk).exists()
    assert not Task.objects.filter(session_id=gone.pk).exists()
    assert not SessionEvent.objects.filter(session_id=gone.pk).exists()
    assert not FeedEvent.objects.filter(tenant_id=tenant_id).exists()
    assert not Membership.objects.filter(tenant_id=tenant_id).exists()
    assert not Agent.objects.filter(name="acme-ext").exists()
    assert not workspace_of(gone.pk).exists() and workspace_of(kept.pk).exists()
    assert branches(repo) == {kept.branch}
    assert Session.objects.filter(pk=kept.pk).exists()


@pytest.mark.parametrize("status", ["queued", "running", "degraded"])
def test_delete_tenant_is_refused_while_a_session_is_active_and_deletes_nothing(repo, status):
    session = worked_session("acme", repo, status=status)

    with pytest.raises(CommandError, match=rf"tenant acme has 1 active session\(s\) \({session.pk}\).*nothing deleted"):
        call_command("delete_tenant", "acme", interactive=False)

    assert Session.objects.filter(pk=session.pk).exists() and Tenant.objects.filter(slug="acme").exists()
    assert workspace_of(session.pk).exists() and branches(repo) == {session.branch}


def test_delete_tenant_is_refused_while_a_paused_sessions_task_still_runs(db):
    session = make_session("acme", status="paused")
    session.tasks.update(status="running")

    with pytest.raises(CommandError, match=r"1 running task\(s\)"):
        call_command("delete_tenant", "acme", interactive=False)

    assert Session.objects.filter(pk=session.pk).exists()


def test_delete_tenant_refuses_an_unknown_tenant_and_an_unconfirmed_delete(db, monkeypatch):
    session = make_session("acme")
    with pytest.raises(CommandError, match="there is no tenant 'nowhere'"):
        call_command("delete_tenant", "nowhere", interactive=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "acm")

    with pytest.raises(CommandError, match="not confirmed"):
        call_command("delete_tenant", "acme")

    assert Session.objects.filter(pk=session.pk).exists()


def test_delete_tenant_run_again_after_its_files_went_finds_nothing_to_remove(repo, django_capture_on_commit_callbacks):
    """The files are removed idempotently: a workspace or branch already gone is no error."""
    session = worked_session("acme", repo)
    subprocess.run(["git", "branch", "-D", session.branch], cwd=repo, check=True, capture_output=True)
    (workspace_of(session.pk) / "work.txt").unlink()

    with django_capture_on_commit_callbacks(execute=True):
        call_command("delete_tenant", "acme", interactive=False, stdout=StringIO())

    assert not workspace_of(session.pk).exists() and branches(repo) == set()


def test_the_admin_cannot_delete_a_tenant_that_has_sessions(db):
    """PROTECT stays: a tenant's sessions go through delete_tenant, which removes their files."""
    from django.db.models import ProtectedError

    make_session("acme")
    with pytest.raises(ProtectedError):
        Tenant.objects.get(slug="acme").delete()


# Retention of abandoned sessions


def age(session: Session, days: int) -> None:
    Session.objects.filter(pk=session.pk).update(updated_at=timezone.now() - timedelta(days=days))


def test_sessions_abandoned_in_pending_or_paused_are_deleted_with_their_files(repo, settings):
    settings.ABANDONED_SESSION_DAYS = 30
    old_pending = make_session("acme", "old pending")
    old_paused = worked_session("acme", repo, status="paused")
    recent_pending = make_session("acme", "recent pending")
    old_queued = make_session("acme", "old queued", status="queued")
    old_running = make_session("acme", "old running", status="running")
    old_paused_still_running = make_session("acme", "paused, a task still running", status="paused")
    old_paused_still_running.tasks.update(status="running")
    old_completed = make_session("acme", "old completed", status="completed")  # SESSION_RETENTION_DAYS' business
    for session in (old_pending, old_paused, old_queued, old_running, old_paused_still_running, old_completed):
        age(session, 31)
    age(recent_pending, 29)

    assert delete_abandoned_sessions() == 2

    kept = set(Session.objects.values_list("title", flat=True))
    assert kept == {"recent pending", "old queued", "old running", "paused, a task still running", "old completed"}
    assert not Task.objects.filter(session_id__in=[old_pending.pk, old_paused.pk]).exists()
    assert not workspace_of(old_paused.pk).exists() and branches(repo) == set()
    assert delete_abandoned_sessions() == 0


def test_abandoned_session_retention_of_zero_keeps_everything(db, settings):
    settings.ABANDONED_SESSION_DAYS = 0
    session = make_session("acme")
    age(session, 3650)

    assert delete_abandoned_sessions() == 0
    assert Session.objects.filter(pk=session.pk).exists()
