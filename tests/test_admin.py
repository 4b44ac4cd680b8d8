"""The operator's admin: every changelist and the session page render, and the cancel and retry
actions go through the state machine (an illegal one warns and changes nothing). Sessions are
added only through the API; what the engine owns is read-only, and what an operator may still
change is checked as the API checks it."""

import re
import threading

import pytest
from django.conf import settings
from django.contrib.messages import WARNING
from django.db import connection
from django.utils import timezone

from agents import services
from agents.models import Agent, AgentEvent, EapDelivery
from orchestrator_project.locking import FairLock
from sessions.models import Session
from tasks import lifecycle
from tasks.models import Task
from tests.conftest import dag_payload, member_client, wait_until

SESSION_CHANGELIST = "/admin/agent_sessions/session/"


@pytest.fixture
def session(api) -> Session:
    response = api.post("/api/v1/sessions/", dag_payload(), format="json")
    assert response.status_code == 201
    return Session.objects.get(pk=response.json()["id"])


@pytest.fixture
def agent(db) -> Agent:
    return Agent.objects.create(
        name="builder",
        capabilities=["code_generation"],
        executor="scripted",
        status=Agent.Status.ONLINE,
        last_heartbeat=timezone.now(),
    )


def run_action(admin_client, action: str, *sessions: Session):
    return admin_client.post(
        SESSION_CHANGELIST,
        {"action": action, "_selected_action": [str(s.pk) for s in sessions]},
        follow=True,
    )


def messages_of(response) -> list[tuple[int, str]]:
    return [(m.level, str(m)) for m in response.context["messages"]]


def change_form(admin_client, path: str, **changes) -> dict:
    """What a browser posts from the admin's change page at `path`: the form's fields as the page
    shows them, with `changes`, and each inline's management form."""
    page = admin_client.get(path)
    assert page.status_code == 200
    form = page.context["adminform"].form
    data = {name: form[name].value() for name in form.fields}
    for inline in page.context["inline_admin_formsets"]:
        management = inline.formset.management_form
        data |= {management.add_prefix(name): value for name, value in management.initial.items()}
    data |= changes
    # A browser sends no unticked box (and 0 == False: compare by identity).
    return {name: value for name, value in data.items() if value is not None and value is not False}


def session_page(session: Session) -> str:
    return f"{SESSION_CHANGELIST}{session.pk}/change/"


def row_of(session: Session) -> dict:
    return Session.objects.filter(pk=session.pk).values().get()


@pytest.mark.parametrize(
    "path",
    [
        "/admin/agent_sessions/session/",
        "/admin/agent_sessions/session/?status=queued",
        "/admin/agent_sessions/session/?status=queued&priority=5",
        "/admin/agent_sessions/session/?tenant__id__exact={tenant}",
        "/admin/agent_sessions/session/?q=rate",
        "/admin/agent_sessions/sessionevent/",
        "/admin/agent_sessions/sessionevent/?to_status=queued",
        "/admin/tasks/task/",
        "/admin/tasks/task/?status=pending",
        "/admin/tasks/task/?capability=code_generation",
        "/admin/agents/agent/",
        "/admin/agents/agent/?status=online",
        "/admin/tenants/tenant/",
        "/admin/tenants/membership/?role=developer",
    ],
)
def test_changelists_render_for_a_superuser(admin_client, session, agent, path):
    lifecycle.start_session(session, actor="test")

    response = admin_client.get(path.format(tenant=session.tenant_id))

    # An unknown filter would redirect to ?e=1; a broken list_display or filter would be a 500.
    assert response.status_code == 200
    assert response.context["cl"].result_count >= 1


def test_session_changelist_status_filter_shows_only_matching_sessions(admin_client, api, session):
    other = Session.objects.get(
        pk=api.post("/api/v1/sessions/", dag_payload(title="Other"), format="json").json()["id"]
    )
    lifecycle.cancel_session(other, actor="test")

    response = admin_client.get(SESSION_CHANGELIST, {"status": "cancelled"})

    assert response.status_code == 200
    shown = list(response.context["cl"].result_list)
    assert shown == [other]


def inline_cells(html: str, group: str, field: str) -> list[str]:
    """One column of an admin inline table (the inline whose formset prefix is `group`), row by row."""
    assert f'id="{group}-group"' in html, f"the page has no {group} inline"
    section = html.split(f'id="{group}-group"', 1)[1].split('inline-group" id=', 1)[0]
    return re.findall(rf'<td class="field-{field}">\s*<p>(.*?)</p>', section)


def test_session_change_page_shows_tasks_and_events_inline(admin_client, session):
    lifecycle.start_session(session, actor="test")

    response = admin_client.get(f"/admin/agent_sessions/session/{session.pk}/change/")

    assert response.status_code == 200
    html = response.content.decode()
    tasks = dict(zip(inline_cells(html, "tasks", "key"), inline_cells(html, "tasks", "status"), strict=True))
    assert tasks == {
        "design": "Queued",
        "api": "Pending",
        "ui": "Pending",
        "tests": "Pending",
        "review": "Pending",
        "docs": "Pending",
    }
    events = zip(
        inline_cells(html, "events", "from_status"),
        inline_cells(html, "events", "to_status"),
        inline_cells(html, "events", "redacted_reason"),
        inline_cells(html, "events", "actor"),
        strict=True,
    )
    assert list(events) == [("Pending", "Queued", "started", "test")]


def test_what_agents_wrote_is_shown_redacted_to_staff_too(admin_client, session, agent):
    planted = f"password=hunter2-planted postgres://app:db-pw-planted@db/x {settings.SECRET_KEY}"
    task = session.tasks.get(key="design")
    Task.objects.filter(pk=task.pk).update(error=planted, result={"output": planted, "diff": planted})
    Session.objects.filter(pk=session.pk).update(result={"workspace": {"diff": planted}})
    session.note(planted, actor="test")
    services.drain_agent(agent, actor="admin:root", reason=planted)

    for path in (
        f"/admin/tasks/task/{task.pk}/change/",
        f"/admin/agent_sessions/session/{session.pk}/change/",
        "/admin/agents/agentevent/",
        f"/admin/agents/agentevent/{AgentEvent.objects.get(agent=agent).pk}/change/",
        "/admin/agent_sessions/sessionevent/",
    ):
        html = admin_client.get(path).content.decode()
        assert "[redacted]" in html, path
        for secret in ("hunter2-planted", "db-pw-planted", settings.SECRET_KEY):
            assert secret not in html, (path, secret)


def test_task_agent_and_tenant_change_pages_render(admin_client, session, agent):
    task = session.tasks.get(key="design")

    for path in (
        f"/admin/tasks/task/{task.pk}/change/",
        f"/admin/agents/agent/{agent.pk}/change/",
        f"/admin/tenants/tenant/{session.tenant_id}/change/",
    ):
        assert admin_client.get(path).status_code == 200, path


def test_admin_cancel_action_cancels_a_pending_session(admin_client, session):
    response = run_action(admin_client, "cancel_sessions", session)

    assert response.status_code == 200
    session.refresh_from_db()
    assert session.status == Session.Status.CANCELLED
    assert session.version == 1
    event = session.events.get()
    assert (event.from_status, event.to_status, event.actor) == ("pending", "cancelled", "admin:admin")
    assert set(session.tasks.values_list("status", flat=True)) == {Task.Status.CANCELLED}
    assert any("Cancelled 1 session" in text for _, text in messages_of(response))


def test_admin_retry_action_on_a_completed_session_warns_and_changes_nothing(admin_client, session):
    for to in (Session.Status.QUEUED, Session.Status.RUNNING, Session.Status.COMPLETED):
        session.transition(to, reason="test")
    before = Session.objects.get(pk=session.pk)

    response = run_action(admin_client, "retry_sessions", session)

    assert response.status_code == 200
    after = Session.objects.get(pk=session.pk)
    assert (after.status, after.version, after.retry_count) == (Session.Status.COMPLETED, before.version, 0)
    assert after.events.count() == 3
    warnings = [text for level, text in messages_of(response) if level == WARNING]
    assert len(warnings) == 1
    assert "completed" in warnings[0]


def test_admin_retry_action_requeues_a_failed_session(admin_client, session):
    session.transition(Session.Status.FAILED, reason="test")

    run_action(admin_client, "retry_sessions", session)

    session.refresh_from_db()
    assert session.status == Session.Status.QUEUED
    assert session.retry_count == 1


def test_admin_cancel_action_on_a_mixed_selection_cancels_what_it_can(admin_client, api, session):
    done = Session.objects.get(pk=api.post("/api/v1/sessions/", dag_payload(title="Done"), format="json").json()["id"])
    lifecycle.cancel_session(done, actor="test")

    response = run_action(admin_client, "cancel_sessions", session, done)

    assert Session.objects.get(pk=session.pk).status == Session.Status.CANCELLED
    assert Session.objects.get(pk=done.pk).events.count() == 1
    levels = [level for level, _ in messages_of(response)]
    assert WARNING in levels
    assert any("Cancelled 1 session" in text for _, text in messages_of(response))


def test_admin_requires_staff(client, db):
    response = client.get(SESSION_CHANGELIST)

    assert response.status_code == 302
    assert "/admin/login/" in response.url


def test_admin_cancel_action_on_a_session_whose_lock_is_held_warns_and_changes_nothing(admin_client, session, settings):
    settings.SESSION_LOCK_TTL_SECONDS = 1  # how long the action waits for the lock
    other = FairLock(f"session:{session.pk}", ttl=30, owner="another process")
    other.acquire(timeout=1)
    try:
        response = run_action(admin_client, "cancel_sessions", session)
    finally:
        other.release()

    assert response.status_code == 200
    assert Session.objects.get(pk=session.pk).status == Session.Status.PENDING
    [warning] = [text for level, text in messages_of(response) if level == WARNING]
    assert session.title in warning


def test_sessions_cannot_be_added_in_the_admin(admin_client, session):
    changelist = admin_client.get(SESSION_CHANGELIST)

    assert admin_client.get(f"{SESSION_CHANGELIST}add/").status_code == 403
    assert admin_client.post(f"{SESSION_CHANGELIST}add/", {"title": "T", "requirements": "R"}).status_code == 403
    assert Session.objects.count() == 1
    assert changelist.context["has_add_permission"] is False
    assert "created through the API" in changelist.content.decode()


def test_a_started_session_is_read_only_in_the_admin(admin_client, session):
    data = change_form(admin_client, session_page(session), title="Renamed", priority="9")
    lifecycle.start_session(session, actor="test")
    before = row_of(session)

    page = admin_client.get(session_page(session))
    data |= {"requirements": "Something else", "repository": "/elsewhere", "status": "completed"}
    response = admin_client.post(session_page(session), data)

    assert page.status_code == 200
    assert page.context["adminform"].form.fields == {}
    assert page.context["has_change_permission"] is False
    assert "Add rate limiting to the payments API" in page.content.decode()  # shown, not editable
    assert response.status_code == 403
    assert row_of(session) == before


def test_a_pending_session_changes_only_its_run_parameters_in_the_admin(admin_client, session):
    before = row_of(session)
    data = change_form(admin_client, session_page(session), title="Renamed", priority="9", fail_fast="on")
    data |= {"requirements": "Something else", "template": "bugfix", "metadata": '{"x": 1}', "status": "queued"}

    response = admin_client.post(session_page(session), data)

    assert response.status_code == 302
    after = row_of(session)
    assert (after["title"], after["priority"], after["fail_fast"]) == ("Renamed", 9, True)
    unchanged = {"title", "priority", "fail_fast", "updated_at"}
    assert {k: v for k, v in after.items() if k not in unchanged} == {
        k: v for k, v in before.items() if k not in unchanged
    }
    assert not session.events.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("title", ""),
        ("title", "x" * 201),
        ("priority", "10"),
        ("priority", "-1"),
        ("timeout_seconds", "0"),
        ("timeout_seconds", str(7 * 86400 + 1)),
        ("max_retries", "11"),
    ],
)
def test_bad_run_parameters_of_a_pending_session_are_a_form_error_and_write_nothing(
    admin_client, session, field, value
):
    before = row_of(session)
    data = change_form(admin_client, session_page(session), **{field: value})

    response = admin_client.post(session_page(session), data)

    assert response.status_code == 200
    assert set(response.context["adminform"].form.errors) == {field}
    assert row_of(session) == before


def test_an_edit_posted_while_the_session_starts_waits_for_the_start_and_is_refused(transactional_db, admin_client):
    session = Session.objects.get(
        pk=member_client("acme", "alice").post("/api/v1/sessions/", dag_payload(), format="json").json()["id"]
    )
    data = change_form(admin_client, session_page(session), priority="9")
    start_holds_the_row, finish_start = threading.Event(), threading.Event()
    responses = []

    def start() -> None:
        def hold(_row):
            start_holds_the_row.set()
            finish_start.wait(timeout=30)

        try:
            session.transition(Session.Status.QUEUED, reason="started", actor="test", effects=hold)
        finally:
            connection.close()

    def edit() -> None:
        try:
            responses.append(admin_client.post(session_page(session), data))
        finally:
            connection.close()

    starter, editor = threading.Thread(target=start), threading.Thread(target=edit)
    starter.start()
    assert start_holds_the_row.wait(timeout=30)
    editor.start()
    wait_until(lambda: waiting_on_a_lock() == 1, what="the admin's POST waiting on the session's row")
    finish_start.set()
    starter.join(timeout=30)
    editor.join(timeout=30)

    assert [r.status_code for r in responses] == [403]
    after = row_of(session)
    assert (after["status"], after["priority"]) == (Session.Status.QUEUED, 5)


def waiting_on_a_lock() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


@pytest.mark.parametrize(
    "path",
    [
        "/admin/tasks/task/add/",
        "/admin/agent_sessions/sessionevent/add/",
    ],
)
def test_tasks_and_session_events_cannot_be_added_in_the_admin(admin_client, session, path):
    assert admin_client.get(path).status_code == 403
    assert admin_client.post(path, {"session": str(session.pk), "key": "extra"}).status_code == 403
    assert session.tasks.count() == 6


def test_a_task_is_view_only_in_the_admin(admin_client, session):
    task = session.tasks.get(key="api")
    before = Task.objects.filter(pk=task.pk).values().get()

    page = admin_client.get(f"/admin/tasks/task/{task.pk}/change/")
    edit = admin_client.post(f"/admin/tasks/task/{task.pk}/change/", {"key": "x", "capability": "testing"})
    delete = admin_client.post(f"/admin/tasks/task/{task.pk}/delete/", {"post": "yes"})

    assert page.status_code == 200
    assert page.context["adminform"].form.fields == {}
    assert "design (pending)" in page.content.decode()  # its dependencies, shown
    assert (edit.status_code, delete.status_code) == (403, 403)
    assert Task.objects.filter(pk=task.pk).values().get() == before


def test_session_events_are_append_only_in_the_admin(admin_client, session):
    lifecycle.start_session(session, actor="test")
    event = session.events.get()

    edit = admin_client.post(f"/admin/agent_sessions/sessionevent/{event.pk}/change/", {"reason": "rewritten"})
    delete = admin_client.post(f"/admin/agent_sessions/sessionevent/{event.pk}/delete/", {"post": "yes"})

    assert (edit.status_code, delete.status_code) == (403, 403)
    assert session.events.get().reason == "started"


def agent_page(agent: Agent) -> str:
    return f"/admin/agents/agent/{agent.pk}/change/"


def test_agents_cannot_be_added_in_the_admin(admin_client, agent):
    assert admin_client.get("/admin/agents/agent/add/").status_code == 403
    assert admin_client.post("/admin/agents/agent/add/", {"name": "phantom", "executor": "shell"}).status_code == 403
    assert list(Agent.objects.values_list("name", flat=True)) == ["builder"]


def test_the_agent_admin_changes_the_tier_and_nothing_the_agent_or_a_drain_writes(admin_client, agent):
    data = change_form(admin_client, agent_page(agent), tier="2")
    services.drain_agent(agent, actor="user:someone-else")  # while the page is open
    before = Agent.objects.filter(pk=agent.pk).values().get()
    data |= {"name": "renamed", "status": "online", "concurrency": "9", "capabilities": '["testing"]'}

    response = admin_client.post(agent_page(agent), data)

    assert response.status_code == 302
    after = Agent.objects.filter(pk=agent.pk).values().get()
    assert after == {**before, "tier": 2}
    assert after["status"] == Agent.Status.DRAINING


@pytest.mark.parametrize("tier", ["-1", "high", ""])
def test_a_bad_tier_is_a_form_error_and_writes_nothing(admin_client, agent, tier):
    before = Agent.objects.filter(pk=agent.pk).values().get()

    response = admin_client.post(agent_page(agent), change_form(admin_client, agent_page(agent), tier=tier))

    assert response.status_code == 200
    assert set(response.context["adminform"].form.errors) == {"tier"}
    assert Agent.objects.filter(pk=agent.pk).values().get() == before


def test_eap_deliveries_cannot_be_deleted_in_the_admin(admin_client, session):
    delivery = EapDelivery.objects.create(task=session.tasks.first(), attempt=1, deadline=timezone.now())

    response = admin_client.post(f"/admin/agents/eapdelivery/{delivery.pk}/delete/", {"post": "yes"})

    assert response.status_code == 403
    assert EapDelivery.objects.filter(pk=delivery.pk).exists()


def test_the_admin_index_names_eap_deliveries_in_the_plural(admin_client):
    html = admin_client.get("/admin/").content.decode()

    assert ">EAP deliveries<" in html
    assert "Eap deliver" not in html


def test_the_admin_drain_action_is_audited_and_the_audit_is_read_only(admin_client, agent):
    response = admin_client.post(
        "/admin/agents/agent/", {"action": "drain_agents", "_selected_action": [str(agent.pk)]}, follow=True
    )

    assert response.status_code == 200
    event = AgentEvent.objects.get(agent=agent)
    assert (event.action, event.actor, event.to_status) == ("drain", "admin:admin", "draining")
    assert admin_client.get("/admin/agents/agentevent/").status_code == 200
    page = admin_client.get(f"/admin/agents/agentevent/{event.pk}/change/")
    assert page.status_code == 200 and page.context["adminform"].form.fields == {}
    edit = admin_client.post(f"/admin/agents/agentevent/{event.pk}/change/", {"actor": "someone"})
    delete = admin_client.post(f"/admin/agents/agentevent/{event.pk}/delete/", {"post": "yes"})
    assert (edit.status_code, delete.status_code) == (403, 403)
    assert admin_client.get("/admin/agents/agentevent/add/").status_code == 403
    assert AgentEvent.objects.get().actor == "admin:admin"


def test_the_session_list_links_each_session_to_its_console_page_and_view_site_opens_the_console(admin_client, session):
    page = admin_client.get(SESSION_CHANGELIST).content.decode()

    assert f'<a href="/console/sessions/{session.pk}/">open<span class="visually-hidden"> ' in page
    assert '<a href="/console/">View site</a>' in page
