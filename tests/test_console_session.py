"""The console's session page through Django's test client: what each role sees and may do, the
404s that keep other tenants' sessions unknown, the actions through the state machine with their
audit record, illegal moves in plain words, redaction of everything an agent or a reason wrote,
and a query count that does not grow with the DAG."""

import re

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.test.utils import CaptureQueriesContext

from agents.models import Agent
from console import graph
from orchestrator_project.locking import FairLock
from sessions.models import FeedEvent, Session, SessionEvent
from tasks.models import Task
from tenants.models import Membership

from .conftest import dag_payload, member_client, member_token

ROLES = [role for role, _ in Membership.Role.choices]


def member(tenant: str, username: str, role: str = Membership.Role.DEVELOPER):
    member_token(tenant, username, role)  # the real command: tenant, user, membership
    return get_user_model().objects.get(username=username)


def console_client(client, tenant: str, username: str, role: str):
    client.force_login(member(tenant, username, role))
    return client


def new_session(tenant: str = "acme", **overrides) -> Session:
    maker = member_client(tenant, f"maker-{tenant}")
    response = maker.post("/api/v1/sessions/", dag_payload(**overrides), format="json")
    assert response.status_code == 201, response.content
    return Session.objects.get(pk=response.json()["id"])


def page_url(session: Session, query: str = "") -> str:
    return f"/console/sessions/{session.pk}/{query}"


def action_url(session: Session, action: str) -> str:
    return f"/console/sessions/{session.pk}/{action}/"


def walk(session: Session, *statuses: str) -> None:
    """Move the session through `statuses` by the state machine, as the engine would."""
    for status in statuses:
        session.transition(status, reason=f"test: to {status}", actor="test")


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]] if response.context else []


def timeline_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'<li class="ev ev-\w+" data-id="(\d+)"', html)]


@pytest.fixture
def session(db) -> Session:
    return new_session()


# --- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_each_role_sees_the_dag_the_timeline_and_actions_only_if_it_may_change_the_session(client, session, role):
    console_client(client, "acme", "reader", role)
    walk(session, Session.Status.QUEUED)

    response = client.get(page_url(session))

    assert response.status_code == 200
    html = response.content.decode()
    assert "Rate limiting" in html and 'id="session-status" class="badge s-queued"' in html
    for task in session.tasks.all():
        assert f'id="task-{task.pk}"' in html and f'href="?task={task.pk}#panel"' in html
    assert "Critical path: design → api → review → docs" in html
    newest_first = FeedEvent.objects.filter(session=session).order_by("-id")
    assert timeline_ids(html) == list(newest_first.values_list("id", flat=True))
    assert "by test" in html  # the transition's actor, in the timeline
    assert 'Allowed now: <span id="allowed-now">pause, cancel</span>' in html
    forms = re.findall(r'<form method="post" action="/console/sessions/[^"]+/(\w+)/"', html)
    if role == Membership.Role.VIEWER:
        assert forms == [] and "you can follow this session, not change it" in html
    else:
        assert forms == ["pause", "resume", "cancel", "retry"]
        # Only what the state machine allows now is shown.
        assert re.findall(r'data-action="(\w+)" data-confirm="[^"]*">', html) == ["pause", "cancel"]
    assert f'"after": "{response.context["after"]}"' in html  # the stream continues from the snapshot


def test_an_anonymous_visitor_is_sent_to_the_login_page(client, session):
    response = client.get(page_url(session))
    assert response.status_code == 302 and response["Location"].startswith("/console/login/?next=")


def test_another_tenants_session_an_unknown_id_and_another_sessions_task_are_not_found(client, session):
    theirs = new_session("other")
    console_client(client, "acme", "alice", Membership.Role.ADMIN)
    mine_task = session.tasks.get(key="design")
    their_task = theirs.tasks.get(key="design")

    assert client.get(page_url(theirs)).status_code == 404
    assert client.get(f"/console/sessions/{'0' * 8}-0000-0000-0000-{'0' * 12}/").status_code == 404
    assert client.get(f"/console/sessions/{theirs.pk}/tasks/{their_task.pk}/").status_code == 404
    assert client.get(f"/console/sessions/{session.pk}/tasks/{their_task.pk}/").status_code == 404
    assert client.get(page_url(session, f"?task={their_task.pk}")).status_code == 404
    assert client.get(page_url(session, "?task=not-a-uuid")).status_code == 404
    assert client.get(f"/console/sessions/{session.pk}/tasks/{mine_task.pk}/").status_code == 200
    assert client.post(action_url(theirs, "cancel"), {"confirm": "yes"}).status_code == 404
    assert Session.objects.get(pk=theirs.pk).status == Session.Status.PENDING


def test_the_panel_shows_a_tasks_facts_output_and_diff(client, session):
    console_client(client, "acme", "alice", Membership.Role.VIEWER)
    task = session.tasks.get(key="api")
    diff = [{"file": "api/limits.py", "additions": 3, "deletions": 1, "status": "modified", "patch": "+LIMIT = 10"}]
    Task.objects.filter(pk=task.pk).update(
        status=Task.Status.COMPLETED, attempts=2, result={"output": "wrote <b>limits</b>", "diff": diff, "tokens": 7}
    )

    fragment = client.get(f"/console/sessions/{session.pk}/tasks/{task.pk}/")
    page = client.get(page_url(session, f"?task={task.pk}"))

    html = fragment.content.decode()
    assert fragment.status_code == 200 and "<html" not in html
    assert "Task api" in html and "code_generation" in html and "2 of 3" in html
    assert '<pre class="output">wrote &lt;b&gt;limits&lt;/b&gt;</pre>' in html  # escaped
    assert "api/limits.py" in html and "+LIMIT = 10" in html and "&quot;tokens&quot;: 7" in html
    assert page.status_code == 200
    assert '<pre class="output">wrote &lt;b&gt;limits&lt;/b&gt;</pre>' in page.content.decode()
    assert re.search(f'id="task-{task.pk}" class="node s-completed[^"]* selected"', page.content.decode())


def test_the_panel_lists_each_attempt_with_its_agent_outcome_and_error(client, session):
    console_client(client, "acme", "alice", Membership.Role.VIEWER)
    builder = Agent.objects.create(name="builder-1", executor="scripted", capabilities=["code_generation"])
    task = session.tasks.get(key="api")
    rows = Task.objects.filter(pk=task.pk)
    rows.update(status=Task.Status.RUNNING, attempts=1, agent=builder)
    rows.update(status=Task.Status.QUEUED, error="attempt 1 failed: boom password=hunter2-planted")
    rows.update(status=Task.Status.RUNNING, attempts=2)
    rows.update(status=Task.Status.COMPLETED, error="")

    html = client.get(f"/console/sessions/{session.pk}/tasks/{task.pk}/").content.decode()

    attempts = re.findall(r"<li>attempt (\d) on ([\w-]+), started .*?: (\w+)", html, re.S)
    assert attempts == [("1", "builder-1", "queued"), ("2", "builder-1", "completed")]
    assert "boom password=[redacted]" in html and "hunter2-planted" not in html


def test_the_filters_work_as_links_without_a_script(client, session):
    console_client(client, "acme", "alice", Membership.Role.VIEWER)
    design = session.tasks.get(key="design")

    html = client.get(page_url(session, "?view=failed")).content.decode()

    assert 'class="graph-scroll view-failed"' in html
    assert f'href="?view=failed&amp;task={design.pk}#panel"' in html
    assert f'href="/console/sessions/{session.pk}/?view=hide-completed#graph" data-view="hide-completed"' in html
    assert 'class="graph-scroll view-all"' in client.get(page_url(session, "?view=bogus")).content.decode()


# --- acting ------------------------------------------------------------------------------------


def test_a_viewers_forged_post_is_refused_and_changes_nothing(client, session):
    console_client(client, "acme", "victor", Membership.Role.VIEWER)
    events = SessionEvent.objects.filter(session=session).count()

    response = client.post(action_url(session, "cancel"), {"confirm": "yes"})

    assert response.status_code == 403
    assert Session.objects.get(pk=session.pk).status == Session.Status.PENDING
    assert SessionEvent.objects.filter(session=session).count() == events


@pytest.mark.parametrize("role", [Membership.Role.OPERATOR, Membership.Role.DEVELOPER])
def test_a_member_who_may_change_it_cancels_and_is_recorded_as_the_actor(client, session, role):
    console_client(client, "acme", "olivia", role)

    response = client.post(action_url(session, "cancel"), {"confirm": "yes"})

    assert response.status_code == 302 and response["Location"] == page_url(session)
    assert Session.objects.get(pk=session.pk).status == Session.Status.CANCELLED
    event = SessionEvent.objects.filter(session=session).latest("id")
    assert (event.to_status, event.actor) == (Session.Status.CANCELLED, "user:olivia")
    shown = client.get(response["Location"])
    assert messages_of(shown) == ["Done: cancel by user:olivia. The session is now cancelled."]
    assert "by user:olivia" in shown.content.decode()  # the audit record, in the timeline


def test_pause_and_resume_go_through_the_state_machine(client, session):
    console_client(client, "acme", "olivia", Membership.Role.OPERATOR)
    walk(session, Session.Status.QUEUED)

    client.post(action_url(session, "pause"), {"confirm": "yes"})
    assert Session.objects.get(pk=session.pk).status == Session.Status.PAUSED
    client.post(action_url(session, "resume"), {"confirm": "yes"})

    assert Session.objects.get(pk=session.pk).status == Session.Status.QUEUED
    actors = list(SessionEvent.objects.filter(session=session).values_list("to_status", "actor"))
    assert actors[-2:] == [("paused", "user:olivia"), ("queued", "user:olivia")]


def test_without_confirmation_an_action_asks_first_and_changes_nothing(client, session):
    console_client(client, "acme", "olivia", Membership.Role.OPERATOR)

    response = client.post(action_url(session, "cancel"))

    html = response.content.decode()
    assert response.status_code == 200 and "Cancel the session “Rate limiting”?" in html
    assert '<input type="hidden" name="confirm" value="yes">' in html and "Yes, cancel the session" in html
    assert Session.objects.get(pk=session.pk).status == Session.Status.PENDING


@pytest.mark.parametrize(
    ("walk_to", "action", "message"),
    [
        (
            ["queued", "running", "completed"],
            "cancel",
            "Cannot cancel: the session is completed; nothing can change it now.",
        ),
        (
            [],
            "resume",
            "Cannot resume: the session is pending; only a paused session can be resumed. Allowed now: cancel.",
        ),
        (
            ["queued", "running"],
            "retry",
            "Cannot retry: the session is running; only a failed, timed-out, stopped or orphaned session can be "
            "retried. Allowed now: pause, cancel.",
        ),
        (
            [],
            "pause",
            "Cannot pause: the session is pending; only a queued or running session can be paused. "
            "Allowed now: cancel.",
        ),
    ],
)
def test_an_illegal_move_is_explained_in_plain_words_and_changes_nothing(client, session, walk_to, action, message):
    console_client(client, "acme", "olivia", Membership.Role.OPERATOR)
    walk(session, *walk_to)
    version = Session.objects.get(pk=session.pk).version

    response = client.post(action_url(session, action), {"confirm": "yes"}, follow=True)

    assert response.redirect_chain == [(page_url(session), 302)]
    assert messages_of(response) == [message]
    assert Session.objects.get(pk=session.pk).version == version


def test_a_retry_past_the_limit_says_so(client, session):
    console_client(client, "acme", "olivia", Membership.Role.OPERATOR)
    walk(session, "queued", "running", "failed")
    Session.objects.filter(pk=session.pk).update(retry_count=3, max_retries=3)

    response = client.post(action_url(session, "retry"), {"confirm": "yes"}, follow=True)

    assert messages_of(response) == ["Cannot retry: the session is failed; it was retried 3 times, its limit."]
    assert 'Allowed now: <span id="allowed-now">none</span>' in response.content.decode()


def test_an_action_while_another_change_holds_the_session_says_try_again(client, session, settings):
    console_client(client, "acme", "olivia", Membership.Role.OPERATOR)
    settings.SESSION_LOCK_TTL_SECONDS = 1  # how long the action waits for the lock
    other = FairLock(f"session:{session.pk}", ttl=30, owner="another process")
    other.acquire(timeout=1)
    try:
        response = client.post(action_url(session, "cancel"), {"confirm": "yes"}, follow=True)
    finally:
        other.release()

    assert messages_of(response) == ["Cannot cancel now: another change of the session is under way. Try again."]
    assert Session.objects.get(pk=session.pk).status == Session.Status.PENDING


def test_bad_action_requests_are_refused(client, session):
    console_client(client, "acme", "olivia", Membership.Role.OPERATOR)

    assert client.post(action_url(session, "explode"), {"confirm": "yes"}).status_code == 404
    assert client.get(action_url(session, "cancel")).status_code == 405
    assert client.get(action_url(session, "explode")).status_code == 405
    assert Session.objects.get(pk=session.pk).status == Session.Status.PENDING


def test_a_retry_from_the_page_runs_the_session_again(client, session):
    console_client(client, "acme", "olivia", Membership.Role.DEVELOPER)
    walk(session, "queued", "running", "failed")

    client.post(action_url(session, "retry"), {"confirm": "yes"})

    reread = Session.objects.get(pk=session.pk)
    assert (reread.status, reread.retry_count) == (Session.Status.QUEUED, 1)
    assert SessionEvent.objects.filter(session=session).latest("id").actor == "user:olivia"


# --- redaction ---------------------------------------------------------------------------------

PRIVATE_KEY = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAplantedkeybody\n-----END RSA PRIVATE KEY-----"


def planted() -> tuple[str, list[str]]:
    """Text with our secret key, a connection string with a password, a private key and a
    password assignment; and the pieces that must never be shown."""
    text = f"key={settings.SECRET_KEY} db postgres://u:pw-planted-9@h/db {PRIVATE_KEY} password=hunter2 done"
    return text, [settings.SECRET_KEY, "pw-planted-9", "MIIEpAIBAAKCAQEAplantedkeybody", "hunter2"]


def test_secrets_in_errors_outputs_diffs_and_reasons_never_reach_the_page_or_the_panel(client, session):
    console_client(client, "acme", "alice", Membership.Role.ADMIN)
    text, secrets = planted()
    walk(session, Session.Status.QUEUED)
    session.note(f"recovered: {text}")  # an event reason
    task = session.tasks.get(key="design")
    diff = [{"file": "settings.py", "additions": 1, "deletions": 0, "patch": f"+{text}"}]
    Task.objects.filter(pk=task.pk).update(
        status=Task.Status.FAILED, error=text, result={"output": text, "diff": diff, "log": text}
    )  # the error goes to the feed too (its trigger)
    other = session.tasks.get(key="api")
    Task.objects.filter(pk=other.pk).update(result={"output": "ok", "diff": f"--- a\n+++ b\n+{text}"})
    Session.objects.filter(pk=session.pk).update(result={"workspace": {"branch": "io/x", "diff": text, "files": []}})

    pages = [
        client.get(page_url(session, f"?task={task.pk}")),
        client.get(f"/console/sessions/{session.pk}/tasks/{task.pk}/"),
        client.get(f"/console/sessions/{session.pk}/tasks/{other.pk}/"),
    ]

    for response in pages:
        html = response.content.decode()
        assert response.status_code == 200
        assert "[redacted]" in html
        for secret in secrets:
            assert secret not in html, secret
    page = pages[0].content.decode()
    assert "recovered: key=[redacted]" in page  # the reason, in the timeline
    assert "error: key=[redacted]" in page  # the task's error, in the timeline


# --- size --------------------------------------------------------------------------------------


def layered_dag(layers: int, width: int) -> dict:
    """layers x width tasks; each depends on two tasks of the layer before."""
    tasks = []
    for layer in range(layers):
        for index in range(width):
            ups = [f"t{layer - 1}-{index}", f"t{layer - 1}-{(index + 1) % width}"] if layer else []
            key = f"t{layer}-{index}"
            tasks.append({"key": key, "title": key, "capability": "code_generation", "depends_on": ups})
    return {"title": "Big", "requirements": "a big DAG", "tasks": tasks}


def test_a_200_task_session_renders_with_as_many_queries_as_a_small_one(db, client, django_assert_max_num_queries):
    console_client(client, "acme", "alice", Membership.Role.OPERATOR)
    small = new_session()
    big = new_session(**layered_dag(20, 10))
    Task.objects.filter(session=big, key__startswith="t0-").update(status=Task.Status.COMPLETED)
    assert big.tasks.count() == 200

    with CaptureQueriesContext(connection) as small_queries:
        assert client.get(page_url(small)).status_code == 200
    with django_assert_max_num_queries(len(small_queries)):
        response = client.get(page_url(big))

    html = response.content.decode()
    assert response.status_code == 200 and html.count('class="node s-') == 200
    assert html.count('<path class="edge') == 19 * 10 * 2
    assert len(timeline_ids(html)) == 1 + 10  # created, and the ten completions


# --- the drawing and the admin's link ------------------------------------------------------------


def test_the_layout_puts_each_task_one_column_after_its_deepest_upstream(session):
    tasks = list(session.tasks.order_by("position"))
    by_key = {t.key: t for t in tasks}
    upstreams = {str(t.pk): [str(u.pk) for u in t.depends_on.all()] for t in tasks}

    drawing = graph.layout(tasks, upstreams, ["design", "api", "review", "docs"])

    column = {n.key: (n.x - graph.MARGIN) // (graph.NODE_WIDTH + graph.COLUMN_GAP) for n in drawing.nodes}
    assert column == {"design": 0, "api": 1, "ui": 1, "tests": 1, "review": 2, "docs": 3}
    ys = [n.y for n in drawing.nodes if n.key in ("api", "ui", "tests")]
    assert ys == sorted(ys)  # in position order, top down
    critical = {(e.source.key, e.target.key) for e in drawing.edges if e.critical}
    assert critical == {("design", "api"), ("api", "review"), ("review", "docs")}
    assert len(drawing.edges) == 7 and drawing.width > 3 * graph.NODE_WIDTH
    assert by_key["design"].pk


def test_the_admin_links_a_session_to_its_console_page(admin_client, session):
    assert session.get_absolute_url() == f"/console/sessions/{session.pk}/"
    content_type = ContentType.objects.get_for_model(Session)

    response = admin_client.get(f"/admin/r/{content_type.pk}/{session.pk}/")

    assert response.status_code == 302 and response["Location"].endswith(f"/console/sessions/{session.pk}/")
