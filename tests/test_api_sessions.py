"""The sessions API on real PostgreSQL and Redis: create, read, filter, paginate,
transitions, idempotency, and who may see or change what (tenants and roles)."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from agents.models import Agent
from sessions.models import Checkpoint, Session, SessionEvent
from tasks.models import Task
from tenants.models import Membership, Tenant
from tests.conftest import at_once, dag_payload, error_of, member_client, queued_broker_messages

SESSIONS = "/api/v1/sessions/"


def url(session_id, action: str = "") -> str:
    return f"{SESSIONS}{session_id}/" + (f"{action}/" if action else "")


def create(client: APIClient, payload: dict | None = None, **headers) -> dict:
    response = client.post(SESSIONS, payload or dag_payload(), format="json", headers=headers)
    assert response.status_code == 201, response.content
    return response.json()


def bulk_sessions(tenant_slug: str, count: int, **fields) -> list[Session]:
    tenant = Tenant.objects.get(slug=tenant_slug)
    return Session.objects.bulk_create(
        Session(tenant=tenant, title=f"bulk {i}", requirements=f"bulk requirement {i}", **fields) for i in range(count)
    )


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


@pytest.fixture
def other_tenant(db) -> APIClient:
    return member_client("globex", "bob")


@pytest.fixture
def viewer(db) -> APIClient:
    return member_client("acme", "victor", Membership.Role.VIEWER)


# Create


def test_create_with_explicit_dag_stores_tasks_and_dependencies(api):
    response = api.post(SESSIONS, dag_payload(priority=4, metadata={"ticket": "PAY-1"}), format="json")

    assert response.status_code == 201
    body = response.json()
    assert response["Location"] == url(body["id"])
    assert body["status"] == "pending"
    assert body["version"] == 0
    assert body["priority"] == 4
    assert body["tenant"] == "acme"
    assert body["task_counts"]["pending"] == 6
    assert sum(body["task_counts"].values()) == 6
    assert set(body["task_counts"]) == set(Task.Status.values)
    assert body["allowed_transitions"] == ["cancelled", "failed", "queued"]

    session = Session.objects.get(pk=body["id"])
    assert session.tenant.slug == "acme"
    assert session.created_by.username == "alice"
    assert session.metadata == {"ticket": "PAY-1"}
    stored = {task.key: task for task in session.tasks.prefetch_related("depends_on")}
    assert set(stored) == {"design", "api", "ui", "tests", "review", "docs"}
    assert {t.key for t in stored["review"].depends_on.all()} == {"api", "ui", "tests"}
    assert {t.key for t in stored["api"].depends_on.all()} == {"design"}
    assert not stored["design"].depends_on.exists()
    assert stored["tests"].capability == "test_generation"
    assert all(task.status == Task.Status.PENDING for task in stored.values())


def test_every_session_answer_links_to_its_console_page_as_an_absolute_url(api, settings):
    settings.ALLOWED_HOSTS = ["orch.example"]
    created = api.post(SESSIONS, dag_payload(), format="json", HTTP_HOST="orch.example:8000").json()
    page = f"http://orch.example:8000/console/sessions/{created['id']}/"

    assert created["console_url"] == page
    assert api.get(url(created["id"]), HTTP_HOST="orch.example:8000").json()["console_url"] == page
    assert api.get(SESSIONS, HTTP_HOST="orch.example:8000").json()["results"][0]["console_url"] == page
    started = api.post(url(created["id"], "start"), HTTP_HOST="orch.example:8000")
    assert started.status_code == 202 and started.json()["console_url"] == page


def test_create_keeps_task_fields_and_defaults_title_from_requirements(api):
    payload = {
        "requirements": "Fix the flaky login test\nIt fails one run in ten.",
        "tasks": [
            {
                "key": "fix",
                "title": "Fix",
                "capability": "bug_fixing",
                "required": False,
                "instructions": "find the race",
                "params": {"duration_s": 0.5, "output": "done"},
                "max_attempts": 2,
            }
        ],
    }
    body = create(api, payload)

    session = Session.objects.get(pk=body["id"])
    assert session.title == "Fix the flaky login test"
    task = session.tasks.get()
    assert (task.key, task.capability, task.required, task.instructions) == (
        "fix",
        "bug_fixing",
        False,
        "find the race",
    )
    assert task.params == {"duration_s": 0.5, "output": "done"}
    assert task.max_attempts == 2


def test_create_without_tasks_decomposes_the_requirements(api):
    body = create(api, {"title": "Small change", "requirements": "Fix the crash in the health endpoint"})

    session = Session.objects.get(pk=body["id"])
    assert session.template == "bugfix"
    assert body["template"] == "bugfix"
    assert body["task_counts"]["pending"] == session.tasks.count() > 1
    fix = session.tasks.get(key="fix")
    assert fix.capability == "bug_fixing"
    assert "> Fix the crash in the health endpoint" in fix.instructions
    assert {t.key for t in fix.depends_on.all()} == {"root_cause"}


def test_create_as_member_of_several_tenants_names_the_tenant(db):
    member_client("globex", "carol")
    client = member_client("acme", "carol")

    unnamed = client.post(SESSIONS, dag_payload(), format="json")
    named = client.post(SESSIONS, dag_payload(tenant="globex"), format="json")

    assert_error(unnamed, 400)
    assert "tenant" in unnamed.json()["error"]["details"]
    assert named.status_code == 201
    assert Session.objects.get().tenant.slug == "globex"


# Idempotency


def test_idempotency_key_returns_the_first_session_and_writes_nothing_more(api):
    first = api.post(SESSIONS, dag_payload(), format="json", headers={"Idempotency-Key": "order-42"})
    second = api.post(SESSIONS, dag_payload(title="Different"), format="json", headers={"Idempotency-Key": "order-42"})

    assert first.status_code == 201
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["title"] == "Rate limiting"
    assert Session.objects.count() == 1
    assert Task.objects.count() == 6
    assert Session.objects.get().idempotency_key == "order-42"


def test_same_idempotency_key_in_another_tenant_creates_its_own_session(api, other_tenant):
    a = api.post(SESSIONS, dag_payload(), format="json", headers={"Idempotency-Key": "k1"})
    b = other_tenant.post(SESSIONS, dag_payload(), format="json", headers={"Idempotency-Key": "k1"})

    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]
    assert Session.objects.count() == 2


def test_concurrent_posts_with_one_idempotency_key_create_one_session(transactional_db):
    clients = [member_client("acme", "alice") for _ in range(8)]

    def submit(client: APIClient) -> tuple[int, str]:
        response = client.post(SESSIONS, dag_payload(), format="json", headers={"Idempotency-Key": "race-1"})
        return response.status_code, response.json()["id"]

    results, errors = at_once([lambda client=client: submit(client) for client in clients])

    assert errors == []
    assert sorted(code for code, _ in results) == [200] * 7 + [201]
    assert len({session_id for _, session_id in results}) == 1
    assert Session.objects.count() == 1
    assert Task.objects.count() == 6


def test_sessions_without_idempotency_key_are_never_deduplicated(api):
    create(api)
    create(api)

    assert Session.objects.count() == 2
    assert Session.objects.filter(idempotency_key__isnull=True).count() == 2


# List, pagination, filters


def test_list_paginates_with_count_next_previous_results(api):
    bulk_sessions("acme", 5)

    first = api.get(SESSIONS, {"page_size": 2}).json()
    second = api.get(first["next"]).json()

    assert set(first) == {"count", "count_exact", "next", "previous", "results"}
    assert (first["count"], first["count_exact"]) == (5, True)
    assert len(first["results"]) == 2
    assert first["previous"] is None
    assert "page=2" in first["next"]
    assert len(second["results"]) == 2
    assert second["previous"] is not None
    ids = {s["id"] for s in first["results"]} | {s["id"] for s in second["results"]}
    assert len(ids) == 4


def test_list_count_stops_at_the_limit_and_pages_past_it_are_refused(api, settings):
    settings.API_COUNT_LIMIT = 3
    sessions = bulk_sessions("acme", 5)

    first = api.get(SESSIONS, {"page_size": 2}).json()
    second = api.get(first["next"]).json()
    past = error_of(api.get(SESSIONS, {"page_size": 2, "page": 3}), 404)

    assert (first["count"], first["count_exact"]) == (3, False)
    assert len(second["results"]) == 1 and second["next"] is None  # pages hold the counted results
    assert "first 3 results" in past["message"] and "cursor" in past["message"]
    _, walked = walk(api, {"cursor": "", "page_size": 2})
    assert sorted(s["id"] for s in walked) == sorted(str(s.pk) for s in sessions)


def test_list_count_is_exact_up_to_the_limit(api, settings):
    settings.API_COUNT_LIMIT = 5
    bulk_sessions("acme", 5)

    body = api.get(SESSIONS, {"status": "pending"}).json()

    assert (body["count"], body["count_exact"]) == (5, True)


def test_list_default_page_size_is_50(api):
    bulk_sessions("acme", 51)

    body = api.get(SESSIONS).json()

    assert body["count"] == 51
    assert len(body["results"]) == 50
    assert body["next"] is not None


def test_list_page_size_accepts_200_and_caps_larger_values_at_200(api):
    bulk_sessions("acme", 201)

    exact = api.get(SESSIONS, {"page_size": 200}).json()
    capped = api.get(SESSIONS, {"page_size": 1000}).json()

    assert len(exact["results"]) == 200
    assert len(capped["results"]) == 200
    assert capped["count"] == 201
    assert capped["next"] is not None


def test_list_is_newest_first_with_task_counts(api):
    older = create(api)
    newer = create(api, {"requirements": "Fix the crash", "template": "bugfix"})

    results = api.get(SESSIONS).json()["results"]

    assert [s["id"] for s in results] == [newer["id"], older["id"]]
    assert results[0]["task_counts"]["pending"] == 7
    assert results[1]["task_counts"]["pending"] == 6


def aged_sessions() -> list[Session]:
    """Seven sessions whose ages are out of insertion order, with a tie, so that only an explicit
    ORDER BY walks them newest first."""
    sessions = bulk_sessions("acme", 7)
    now = timezone.now()
    for session, age in zip(sessions, [3, 0, 5, 1, 1, 6, 2], strict=True):
        Session.objects.filter(pk=session.pk).update(created_at=now - timedelta(hours=age))
    return sessions


def walk(api, params: dict) -> tuple[dict, list[dict]]:
    """The first page of the session list, and every session on it and the pages after it."""
    first = page = api.get(SESSIONS, params).json()
    walked = []
    while True:
        walked += page["results"]
        if page["next"] is None:
            return first, walked
        page = api.get(page["next"]).json()


def test_list_pages_walk_every_session_once_newest_first(api):
    sessions = aged_sessions()

    _, walked = walk(api, {"page_size": 2})

    ids = [s["id"] for s in walked]
    assert sorted(ids) == sorted(str(s.pk) for s in sessions)
    assert ids[0] == str(sessions[1].pk)
    assert ids[-1] == str(sessions[5].pk)
    created = [s["created_at"] for s in walked]
    assert created == sorted(created, reverse=True)


def test_list_by_cursor_walks_every_session_once_newest_first_without_a_count(api):
    sessions = aged_sessions()
    Task.objects.create(session=sessions[1], key="a", title="a", capability="testing")

    first, walked = walk(api, {"cursor": "", "page_size": 2})

    assert set(first) == {"next", "previous", "results"}
    ids = [s["id"] for s in walked]
    assert sorted(ids) == sorted(str(s.pk) for s in sessions) and len(ids) == 7
    assert [s["created_at"] for s in walked] == sorted((s["created_at"] for s in walked), reverse=True)
    assert walked[0]["task_counts"]["pending"] == 1  # counted for the page's rows


@pytest.mark.parametrize("cursor", ["not-base64!", "bz0tMQ==", "cD0yMDI2"])  # junk, o=-1, a bad position
def test_a_bad_cursor_is_a_400_naming_it(api, cursor):
    bulk_sessions("acme", 3)

    response = api.get(SESSIONS, {"cursor": cursor})

    assert response.status_code == 400
    assert "cursor" in response.json()["error"]["details"]


def test_list_query_count_does_not_grow_with_page_size(api):
    def queries_for_list() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert api.get(SESSIONS, {"page_size": 100}).status_code == 200
        return len(captured)

    create(api)
    few = queries_for_list()
    for _ in range(5):
        create(api)

    assert queries_for_list() == few


def test_list_filtered_by_status_reads_no_more_rows_than_the_page(api):
    # DISTINCT, or a count without a limit, would make PostgreSQL read every matching session.
    bulk_sessions("acme", 3)

    with CaptureQueriesContext(connection) as captured:
        assert api.get(SESSIONS, {"status": ["pending", "queued"]}).status_code == 200

    sessions = [q["sql"] for q in captured if 'FROM "agent_sessions_session"' in q["sql"]]
    assert len(sessions) == 2  # the capped count and the page
    assert not any("DISTINCT" in sql for sql in sessions), sessions
    assert all("LIMIT" in sql for sql in sessions), sessions


def test_filter_by_status_accepts_several_values(api):
    _pending, queued, cancelled = bulk_sessions("acme", 3)
    Session.objects.filter(pk=queued.pk).update(status=Session.Status.QUEUED)
    Session.objects.filter(pk=cancelled.pk).update(status=Session.Status.CANCELLED)

    only_queued = api.get(SESSIONS, {"status": "queued"}).json()
    two = api.get(f"{SESSIONS}?status=queued&status=cancelled").json()

    assert [s["id"] for s in only_queued["results"]] == [str(queued.pk)]
    assert {s["id"] for s in two["results"]} == {str(queued.pk), str(cancelled.pk)}


def test_filter_by_priority(api):
    create(api, dag_payload(priority=5))
    create(api, dag_payload(priority=1))

    body = api.get(SESSIONS, {"priority": 5}).json()

    assert body["count"] == 1
    assert body["results"][0]["priority"] == 5


def test_filter_by_created_range(api):
    old, middle, new = bulk_sessions("acme", 3)
    now = timezone.now()
    Session.objects.filter(pk=old.pk).update(created_at=now - timedelta(days=10))
    Session.objects.filter(pk=middle.pk).update(created_at=now - timedelta(days=5))
    Session.objects.filter(pk=new.pk).update(created_at=now - timedelta(hours=1))

    after = api.get(SESSIONS, {"created_after": (now - timedelta(days=6)).isoformat()}).json()
    before = api.get(SESSIONS, {"created_before": (now - timedelta(days=6)).isoformat()}).json()
    between = api.get(
        SESSIONS,
        {
            "created_after": (now - timedelta(days=6)).isoformat(),
            "created_before": (now - timedelta(days=1)).isoformat(),
        },
    ).json()

    assert {s["id"] for s in after["results"]} == {str(middle.pk), str(new.pk)}
    assert [s["id"] for s in before["results"]] == [str(old.pk)]
    assert [s["id"] for s in between["results"]] == [str(middle.pk)]


def test_search_matches_title_or_requirements_case_insensitively(api):
    by_title = create(api, {"title": "Payments throttling", "requirements": "something"})
    by_requirements = create(api, {"title": "Other", "requirements": "Add THROTTLING to search"})
    create(api, {"title": "Unrelated", "requirements": "docs only"})

    body = api.get(SESSIONS, {"search": "throttling"}).json()

    assert {s["id"] for s in body["results"]} == {by_title["id"], by_requirements["id"]}


def test_list_shows_only_the_callers_tenant(api, other_tenant):
    ours = create(api)
    create(other_tenant)

    body = api.get(SESSIONS).json()

    assert body["count"] == 1
    assert body["results"][0]["id"] == ours["id"]


# Detail and sub-resources


def test_detail_returns_the_session_with_counts_and_progress(api):
    created = create(api)

    response = api.get(url(created["id"]))

    assert response.status_code == 200
    body = response.json()
    for field in ("id", "status", "version", "priority", "created_at", "task_counts", "progress", "requirements"):
        assert field in body
    assert body["id"] == created["id"]
    assert body["task_counts"]["pending"] == 6
    assert body["progress"] == 0.0


def test_progress_counts_finished_tasks(api):
    created = create(api)
    Task.objects.filter(session_id=created["id"], key__in=["design", "api", "ui"]).update(status=Task.Status.COMPLETED)

    body = api.get(url(created["id"])).json()

    assert body["task_counts"]["completed"] == 3
    assert body["task_counts"]["pending"] == 3
    assert body["progress"] == 0.5


def test_tasks_subresource_lists_the_dag_in_order_with_dependency_keys(api):
    created = create(api)

    response = api.get(url(created["id"], "tasks"))

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 6
    assert [t["key"] for t in body["results"]] == ["design", "api", "ui", "tests", "review", "docs"]
    review = body["results"][4]
    assert sorted(review["depends_on"]) == ["api", "tests", "ui"]
    for field in ("id", "key", "status", "capability", "depends_on", "agent", "attempts", "result", "error"):
        assert field in review
    assert review["agent"] is None
    assert review["session"] == created["id"]


def test_events_subresource_lists_transitions_in_order_and_filters_after(api):
    created = create(api)
    session = Session.objects.get(pk=created["id"])
    session.transition(Session.Status.QUEUED, reason="started", actor="test")
    session.transition(Session.Status.PAUSED, reason="paused", actor="test")

    body = api.get(url(created["id"], "events")).json()
    first_id = body["results"][0]["id"]
    later = api.get(url(created["id"], "events"), {"after": first_id}).json()

    assert [(e["from_status"], e["to_status"]) for e in body["results"]] == [
        ("pending", "queued"),
        ("queued", "paused"),
    ]
    assert set(body["results"][0]) >= {"id", "from_status", "to_status", "reason", "created_at"}
    assert body["results"][0]["reason"] == "started"
    assert [(e["from_status"], e["to_status"]) for e in later["results"]] == [("queued", "paused")]


def test_checkpoints_list_what_was_completed_up_to_each(api):
    created = create(api)
    for key in ("review", "design", "api"):
        Checkpoint.objects.create(session_id=created["id"], task=Task.objects.get(session_id=created["id"], key=key))

    body = api.get(url(created["id"], "checkpoints")).json()
    page_two = api.get(url(created["id"], "checkpoints"), {"page": 2, "page_size": 2}).json()

    assert body["count"] == 3
    assert [c["task"] for c in body["results"]] == ["review", "design", "api"]
    assert [c["completed_task_keys"] for c in body["results"]] == [
        ["review"],
        ["design", "review"],
        ["api", "design", "review"],
    ]
    assert [c["completed_task_keys"] for c in page_two["results"]] == [["api", "design", "review"]]


def test_task_detail_returns_one_task_with_result(api):
    created = create(api)
    task = Task.objects.get(session_id=created["id"], key="review")
    agent = Agent.objects.create(name="builder-1", capabilities=["code_review"], executor="scripted")
    Task.objects.filter(pk=task.pk).update(
        status=Task.Status.COMPLETED, agent=agent, attempts=1, result={"output": "lgtm", "simulated": True}
    )

    response = api.get(f"/api/v1/tasks/{task.pk}/")

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(task.pk)
    assert body["key"] == "review"
    assert body["status"] == "completed"
    assert body["agent"] == "builder-1"
    assert body["attempts"] == 1
    assert body["result"] == {"output": "lgtm", "simulated": True}
    assert body["error"] == ""
    assert sorted(body["depends_on"]) == ["api", "tests", "ui"]


def test_agents_list_and_detail(api):
    now = timezone.now()
    live = Agent.objects.create(
        name="builder",
        capabilities=["code_generation", "system_design"],
        executor="scripted",
        status=Agent.Status.ONLINE,
        last_heartbeat=now,
    )
    Agent.objects.create(name="reviewer", capabilities=["code_review"], executor="shell", status=Agent.Status.OFFLINE)

    listing = api.get("/api/v1/agents/").json()
    detail = api.get(f"/api/v1/agents/{live.pk}/").json()
    online = api.get("/api/v1/agents/", {"status": "online"}).json()

    assert listing["count"] == 2
    assert [a["name"] for a in listing["results"]] == ["builder", "reviewer"]
    assert detail["name"] == "builder"
    assert detail["status"] == "online"
    assert detail["is_live"] is True
    assert detail["queues"] == ["cap.code_generation", "cap.system_design", "agent.builder"]
    assert [a["name"] for a in online["results"]] == ["builder"]


def test_unknown_agent_is_404(api):
    assert_error(api.get("/api/v1/agents/999999/"), 404, "not_found")


# Transitions


def test_start_moves_pending_to_queued_and_enqueues_dispatch_after_commit(api, django_capture_on_commit_callbacks):
    created = create(api)

    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(url(created["id"], "start"))

    assert response.status_code == 202
    assert response.json()["status"] == "queued"
    assert response.json()["version"] == 1
    session = Session.objects.get(pk=created["id"])
    assert session.status == Session.Status.QUEUED
    assert session.deadline is not None
    # The task without upstreams is released; the rest wait for their dependencies.
    statuses = dict(Task.objects.filter(session=session).values_list("key", "status"))
    assert statuses["design"] == Task.Status.QUEUED
    assert {statuses[k] for k in ("api", "ui", "tests", "review", "docs")} == {Task.Status.PENDING}
    event = SessionEvent.objects.get(session=session)
    assert (event.from_status, event.to_status, event.actor) == ("pending", "queued", "user:alice")
    dispatches = [m for m in queued_broker_messages() if m["headers"]["task"] == "tasks.dispatch_session"]
    assert len(dispatches) == 1
    assert str(session.pk) in dispatches[0]["headers"]["argsrepr"]


def test_start_enqueues_nothing_before_commit(api, django_capture_on_commit_callbacks):
    created = create(api)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert api.post(url(created["id"], "start")).status_code == 202

    assert callbacks, "start must defer its enqueue to on_commit"
    assert queued_broker_messages() == []


def test_pause_then_resume_then_cancel(api):
    created = create(api)
    session_url = url(created["id"])
    api.post(session_url + "start/")

    paused = api.post(session_url + "pause/")
    assert paused.status_code == 202
    assert paused.json()["status"] == "paused"
    assert Session.objects.get(pk=created["id"]).status == Session.Status.PAUSED

    resumed = api.post(session_url + "resume/")
    assert resumed.status_code == 202
    assert resumed.json()["status"] == "queued"
    assert Session.objects.get(pk=created["id"]).status == Session.Status.QUEUED

    cancelled = api.post(session_url + "cancel/")
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "cancelled"
    session = Session.objects.get(pk=created["id"])
    assert session.status == Session.Status.CANCELLED
    assert session.version == 4
    assert set(session.tasks.values_list("status", flat=True)) == {Task.Status.CANCELLED}
    assert list(session.events.values_list("to_status", flat=True)) == ["queued", "paused", "queued", "cancelled"]


def test_cancel_pending_session_cancels_it_and_its_tasks(api):
    created = create(api)

    response = api.post(url(created["id"], "cancel"))

    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    assert Session.objects.get(pk=created["id"]).status == Session.Status.CANCELLED
    assert not Task.objects.filter(session_id=created["id"]).exclude(status=Task.Status.CANCELLED).exists()


def test_cancel_running_session_stops_it(api):
    created = create(api)
    session = Session.objects.get(pk=created["id"])
    session.transition(Session.Status.QUEUED, reason="started")
    session.transition(Session.Status.RUNNING, reason="first task claimed")

    response = api.post(url(created["id"], "cancel"))

    assert response.status_code == 202
    assert response.json()["status"] == "stopped"
    assert Session.objects.get(pk=created["id"]).status == Session.Status.STOPPED


def test_retry_failed_session_requeues_it_and_counts_the_retry(api):
    created = create(api)
    session = Session.objects.get(pk=created["id"])
    session.transition(Session.Status.QUEUED, reason="started")
    Task.objects.filter(session=session, key="design").update(status=Task.Status.COMPLETED)
    Task.objects.filter(session=session, key="api").update(status=Task.Status.FAILED, attempts=3, error="boom")
    session.transition(Session.Status.FAILED, reason="required task failed")

    response = api.post(url(created["id"], "retry"))

    assert response.status_code == 202
    assert response.json()["status"] == "queued"
    session.refresh_from_db()
    assert session.status == Session.Status.QUEUED
    assert session.retry_count == 1
    statuses = dict(session.tasks.values_list("key", "status"))
    assert statuses["design"] == Task.Status.COMPLETED
    assert statuses["api"] == Task.Status.QUEUED
    api_task = session.tasks.get(key="api")
    assert (api_task.attempts, api_task.error) == (0, "")


def test_retry_beyond_max_retries_is_409(api):
    created = create(api, dag_payload(max_retries=0))
    session = Session.objects.get(pk=created["id"])
    session.transition(Session.Status.FAILED, reason="validation")

    error = assert_error(api.post(url(created["id"], "retry")), 409, "invalid_transition")

    assert "retry limit" in error["message"]
    assert Session.objects.get(pk=created["id"]).status == Session.Status.FAILED


def test_illegal_transition_is_409_naming_the_allowed_targets(api):
    created = create(api)

    error = assert_error(api.post(url(created["id"], "pause")), 409, "invalid_transition")

    assert error["details"]["from"] == "pending"
    assert error["details"]["to"] == "paused"
    assert error["details"]["allowed"] == ["cancelled", "failed", "queued"]
    assert "queued" in error["message"]
    session = Session.objects.get(pk=created["id"])
    assert (session.status, session.version) == (Session.Status.PENDING, 0)
    assert not session.events.exists()


@pytest.mark.parametrize("action", ["start", "pause", "resume", "cancel", "retry"])
def test_every_transition_on_a_terminal_session_is_409_with_no_allowed_targets(api, action):
    created = create(api)
    api.post(url(created["id"], "cancel"))

    error = assert_error(api.post(url(created["id"], action)), 409, "invalid_transition")

    assert error["details"]["allowed"] == []
    session = Session.objects.get(pk=created["id"])
    assert session.status == Session.Status.CANCELLED
    assert session.events.count() == 1


def test_retry_on_pending_session_is_409(api):
    created = create(api)

    error = assert_error(api.post(url(created["id"], "retry")), 409, "invalid_transition")

    assert error["details"]["allowed"] == ["cancelled", "failed", "queued"]
    assert Session.objects.get(pk=created["id"]).retry_count == 0


# Tenancy and roles


def test_another_tenants_session_is_404_on_detail_tasks_events_and_start(api, other_tenant):
    theirs = create(other_tenant)

    for response in (
        api.get(url(theirs["id"])),
        api.get(url(theirs["id"], "tasks")),
        api.get(url(theirs["id"], "events")),
        api.post(url(theirs["id"], "start")),
        api.post(url(theirs["id"], "cancel")),
    ):
        assert_error(response, 404, "not_found")
    session = Session.objects.get(pk=theirs["id"])
    assert session.status == Session.Status.PENDING
    assert not session.events.exists()


def test_another_tenants_task_is_404(api, other_tenant):
    theirs = create(other_tenant)
    task = Task.objects.filter(session_id=theirs["id"]).first()

    assert_error(api.get(f"/api/v1/tasks/{task.pk}/"), 404, "not_found")


def test_viewer_reads_but_cannot_create(api, viewer):
    created = create(api)

    assert viewer.get(SESSIONS).json()["count"] == 1
    assert viewer.get(url(created["id"])).status_code == 200
    assert viewer.get(url(created["id"], "tasks")).status_code == 200
    assert_error(viewer.post(SESSIONS, dag_payload(), format="json"), 403, "permission_denied")
    assert Session.objects.count() == 1


@pytest.mark.parametrize("action", ["start", "pause", "resume", "cancel", "retry"])
def test_viewer_cannot_transition(api, viewer, action):
    created = create(api)

    assert_error(viewer.post(url(created["id"], action)), 403, "permission_denied")

    session = Session.objects.get(pk=created["id"])
    assert (session.status, session.version) == (Session.Status.PENDING, 0)


def test_viewer_in_one_tenant_cannot_mutate_there_even_if_developer_elsewhere(api):
    created = create(api)
    member_client("globex", "victor", Membership.Role.DEVELOPER)
    mixed = member_client("acme", "victor", Membership.Role.VIEWER)

    assert_error(mixed.post(url(created["id"], "start")), 403, "permission_denied")
    assert_error(mixed.post(SESSIONS, dag_payload(tenant="acme"), format="json"), 403, "permission_denied")
    assert Session.objects.get(pk=created["id"]).status == Session.Status.PENDING
    assert Session.objects.count() == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", SESSIONS),
        ("post", SESSIONS),
        ("get", "/api/v1/agents/"),
        ("get", "/api/v1/tasks/00000000-0000-0000-0000-000000000000/"),
    ],
)
def test_no_token_is_401(db, method, path):
    response = getattr(APIClient(), method)(path, dag_payload() if method == "post" else None, format="json")

    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"].startswith("Token")
    assert Session.objects.count() == 0


def test_invalid_token_is_401(db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")

    assert_error(client.get(SESSIONS), 401, "authentication_failed")


def test_user_without_membership_is_403(db):
    from django.contrib.auth import get_user_model

    from tokens.services import issue_token

    loner = get_user_model().objects.create(username="loner")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(loner)[1]}")

    assert_error(client.get(SESSIONS), 403)
    assert_error(client.post(SESSIONS, dag_payload(), format="json"), 403)
    assert Session.objects.count() == 0
