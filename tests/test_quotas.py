"""Per-tenant quotas on real PostgreSQL: active sessions, open tasks, tasks per session and each
role's highest priority; refused with 429 quota_exceeded and nothing written; the 50-way race;
retry; the preview; GET /api/v1/tenant/; and the admin that edits them."""

import jsonschema
import pytest
from django.core.exceptions import ValidationError
from rest_framework.test import APIClient

from sessions.models import Session
from tasks.models import Task
from tenants.models import Membership, Tenant
from tests.conftest import at_once, dag_payload, error_of, member_client, member_token, staff_client

SESSIONS = "/api/v1/sessions/"
PREVIEW = "/api/v1/decompositions/preview/"
TENANT = "/api/v1/tenant/"


def set_quotas(slug: str = "acme", **fields) -> Tenant:
    Tenant.objects.filter(slug=slug).update(**fields)
    return Tenant.objects.get(slug=slug)


def create(client: APIClient, payload: dict | None = None, **headers):
    return client.post(SESSIONS, payload or dag_payload(), format="json", headers=headers)


def assert_quota_exceeded(response, quota: str, *, limit: int, used: int, requested: int) -> dict:
    error = error_of(response, 429)
    assert error["code"] == "quota_exceeded"
    assert error["details"] == {"quota": quota, "limit": limit, "used": used, "requested": requested}
    assert quota in error["message"] and str(limit) in error["message"]
    return error


def settle(session_id, status=Session.Status.CANCELLED) -> None:
    Session.objects.filter(pk=session_id).update(status=status)


@pytest.fixture
def operator(db) -> APIClient:
    return member_client("acme", "olga", Membership.Role.OPERATOR)


# Active sessions


def test_sessions_up_to_the_active_quota_are_created_and_the_next_is_429_with_nothing_written(api):
    set_quotas(max_active_sessions=2)
    assert create(api).status_code == 201
    assert create(api).status_code == 201  # at the limit

    assert_quota_exceeded(create(api), "active_sessions", limit=2, used=2, requested=1)
    assert Session.objects.count() == 2
    assert Task.objects.count() == 12


def test_settled_sessions_free_their_place_and_pending_paused_or_running_ones_hold_it(api):
    set_quotas(max_active_sessions=3)
    ids = [create(api).json()["id"] for _ in range(3)]
    Session.objects.filter(pk=ids[1]).update(status=Session.Status.PAUSED)
    Session.objects.filter(pk=ids[2]).update(status=Session.Status.RUNNING)
    assert_quota_exceeded(create(api), "active_sessions", limit=3, used=3, requested=1)

    settle(ids[0], Session.Status.COMPLETED)

    assert create(api).status_code == 201


def test_the_active_sessions_default_comes_from_the_setting_and_the_tenant_overrides_it(api, settings):
    settings.QUOTA_ACTIVE_SESSIONS = 1
    assert create(api).status_code == 201
    assert_quota_exceeded(create(api), "active_sessions", limit=1, used=1, requested=1)

    set_quotas(max_active_sessions=2)  # wider than the setting: a tenant's quota is its own

    assert create(api).status_code == 201


def test_a_zero_quota_stops_new_sessions(api):
    set_quotas(max_active_sessions=0)

    assert_quota_exceeded(create(api), "active_sessions", limit=0, used=0, requested=1)
    assert not Session.objects.exists()


def test_another_tenants_sessions_do_not_count(api):
    globex = member_client("globex", "bob")
    set_quotas(max_active_sessions=1)
    set_quotas("globex", max_active_sessions=1)

    assert create(globex).status_code == 201
    assert create(api).status_code == 201


def test_an_idempotent_replay_at_the_quota_returns_the_session_not_429(api):
    set_quotas(max_active_sessions=1)
    first = create(api, **{"Idempotency-Key": "k-1"})
    assert first.status_code == 201

    again = create(api, **{"Idempotency-Key": "k-1"})

    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert_quota_exceeded(create(api, **{"Idempotency-Key": "k-2"}), "active_sessions", limit=1, used=1, requested=1)
    assert Session.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_creates_never_exceed_the_active_sessions_quota():
    token = member_token("acme", "alice")
    set_quotas(max_active_sessions=10)
    clients = []
    for _ in range(50):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        clients.append(client)

    def submit(client: APIClient) -> tuple[int, dict]:
        response = create(client)
        return response.status_code, response.json()

    answers, errors = at_once([lambda client=client: submit(client) for client in clients])

    assert errors == []
    codes = sorted(code for code, _ in answers)
    assert codes == [201] * 10 + [429] * 40
    refused = [body["error"] for code, body in answers if code == 429]
    assert all(e["code"] == "quota_exceeded" and e["details"]["quota"] == "active_sessions" for e in refused)
    assert all(e["details"]["used"] == 10 and e["details"]["limit"] == 10 for e in refused)
    assert Session.objects.count() == 10
    assert Task.objects.count() == 60


# Open tasks


def test_open_tasks_up_to_the_quota_are_accepted_and_one_session_more_is_429(api):
    set_quotas(max_open_tasks=12)
    assert create(api).status_code == 201
    assert create(api).status_code == 201  # 12 of 12

    assert_quota_exceeded(create(api), "open_tasks", limit=12, used=12, requested=6)
    assert Session.objects.count() == 2


def test_finished_tasks_and_settled_sessions_leave_the_open_tasks_quota(api, settings):
    settings.QUOTA_OPEN_TASKS = 10
    first = create(api).json()["id"]
    assert_quota_exceeded(create(api), "open_tasks", limit=10, used=6, requested=6)

    Task.objects.filter(session_id=first, key__in=["design", "api"]).update(status=Task.Status.COMPLETED)
    assert create(api).status_code == 201  # 4 + 6

    assert_quota_exceeded(create(api), "open_tasks", limit=10, used=10, requested=6)
    settle(first, Session.Status.FAILED)  # its 4 unfinished tasks no longer count
    assert_quota_exceeded(create(api), "open_tasks", limit=10, used=6, requested=6)


# Tasks per session


def test_a_session_larger_than_the_tenants_tasks_per_session_is_429(api):
    set_quotas(max_tasks_per_session=5)

    assert_quota_exceeded(create(api), "tasks_per_session", limit=5, used=6, requested=6)
    assert not Session.objects.exists()
    set_quotas(max_tasks_per_session=6)
    assert create(api).status_code == 201


def test_a_decomposed_session_counts_its_planned_tasks(api):
    set_quotas(max_tasks_per_session=1)

    response = api.post(SESSIONS, {"requirements": "Add rate limiting to the payments API"}, format="json")

    error = error_of(response, 429)
    assert error["details"]["quota"] == "tasks_per_session" and error["details"]["used"] > 1


def test_tasks_per_session_never_widens_max_tasks_per_session(api, settings):
    tenant = set_quotas(max_tasks_per_session=50)
    settings.MAX_TASKS_PER_SESSION = 5  # lowered after the tenant was saved

    assert tenant.tasks_per_session_limit() == 5
    with pytest.raises(ValidationError) as refused:
        tenant.full_clean()
    assert "max_tasks_per_session" in refused.value.message_dict


def test_tasks_per_session_defaults_to_max_tasks_per_session(db, settings):
    settings.MAX_TASKS_PER_SESSION = 7

    assert Tenant.objects.create(slug="t", name="T").tasks_per_session_limit() == 7


# Priority per role


@pytest.mark.parametrize(
    ("role", "highest"),
    [(Membership.Role.DEVELOPER, 5), (Membership.Role.OPERATOR, 9), (Membership.Role.ADMIN, 9)],
)
def test_each_role_may_set_up_to_its_highest_priority_by_default(db, role, highest):
    client = member_client("acme", f"member-{role}", role)

    assert create(client, dag_payload(priority=highest)).status_code == 201
    if highest < 9:
        response = create(client, dag_payload(priority=highest + 1))
        assert_quota_exceeded(response, "max_priority", limit=highest, used=highest + 1, requested=highest + 1)
        assert Session.objects.count() == 1


@pytest.mark.parametrize(
    ("role", "field"),
    [
        (Membership.Role.DEVELOPER, "max_priority_developer"),
        (Membership.Role.OPERATOR, "max_priority_operator"),
        (Membership.Role.ADMIN, "max_priority_admin"),
    ],
)
def test_the_tenant_sets_each_roles_highest_priority(db, role, field):
    client = member_client("acme", f"member-{role}", role)
    set_quotas(**{field: 2})

    assert create(client, dag_payload(priority=2)).status_code == 201
    assert_quota_exceeded(create(client, dag_payload(priority=3)), "max_priority", limit=2, used=3, requested=3)


def test_the_role_defaults_come_from_the_settings(api, settings):
    settings.QUOTA_MAX_PRIORITY_DEVELOPER = 8

    assert create(api, dag_payload(priority=8)).status_code == 201
    assert error_of(create(api, dag_payload(priority=9)), 429)["details"]["limit"] == 8


def test_a_member_of_two_tenants_gets_each_tenants_cap(db):
    alice = member_client("acme", "alice", Membership.Role.DEVELOPER)
    member_client("globex", "alice", Membership.Role.OPERATOR)

    assert create(alice, dag_payload(tenant="globex", priority=9)).status_code == 201
    assert error_of(create(alice, dag_payload(tenant="acme", priority=9)), 429)["details"]["limit"] == 5


# Retry


def failed_session(api) -> Session:
    session = Session.objects.get(pk=create(api).json()["id"])
    Task.objects.filter(session=session, key="design").update(status=Task.Status.COMPLETED)
    Task.objects.filter(session=session).exclude(key="design").update(status=Task.Status.CANCELLED)
    session.transition(Session.Status.QUEUED, reason="started")
    session.transition(Session.Status.FAILED, reason="a required task failed")
    return session


def test_retry_is_429_when_the_active_sessions_quota_is_full_and_changes_nothing(api):
    session = failed_session(api)
    set_quotas(max_active_sessions=2)
    create(api)
    create(api)

    response = api.post(f"{SESSIONS}{session.pk}/retry/")

    assert_quota_exceeded(response, "active_sessions", limit=2, used=2, requested=1)
    session.refresh_from_db()
    assert (session.status, session.retry_count) == (Session.Status.FAILED, 0)
    assert session.tasks.filter(status=Task.Status.CANCELLED).count() == 5


def test_retry_counts_the_tasks_that_run_again_against_the_open_tasks_quota(api):
    session = failed_session(api)
    create(api)
    set_quotas(max_open_tasks=10)

    assert_quota_exceeded(api.post(f"{SESSIONS}{session.pk}/retry/"), "open_tasks", limit=10, used=6, requested=5)
    set_quotas(max_open_tasks=11)
    response = api.post(f"{SESSIONS}{session.pk}/retry/")
    assert response.status_code == 202, response.content
    assert response.json()["status"] == "queued"


# Preview


def test_preview_reports_the_priority_and_tasks_per_session_quotas(api):
    response = api.post(PREVIEW, dag_payload(priority=9), format="json")
    assert_quota_exceeded(response, "max_priority", limit=5, used=9, requested=9)
    set_quotas(max_tasks_per_session=3)
    response = api.post(PREVIEW, dag_payload(), format="json")
    assert_quota_exceeded(response, "tasks_per_session", limit=3, used=6, requested=6)


def test_preview_does_not_count_use_and_a_viewer_has_no_priority_cap(api):
    set_quotas(max_active_sessions=0, max_open_tasks=0)
    viewer = member_client("acme", "victor", Membership.Role.VIEWER)

    assert api.post(PREVIEW, dag_payload(), format="json").status_code == 200
    assert viewer.post(PREVIEW, dag_payload(priority=9), format="json").status_code == 200


# GET /api/v1/tenant/


def test_tenant_shows_weight_and_quotas_with_their_use(api, settings):
    settings.QUOTA_OPEN_TASKS = 500
    set_quotas(max_active_sessions=4, max_priority_operator=7, weight=3)
    first = create(api).json()["id"]
    create(api)
    Task.objects.filter(session_id=first, key="design").update(status=Task.Status.COMPLETED)
    settled = create(api).json()["id"]
    settle(settled)

    body = api.get(TENANT).json()

    assert body == {
        "slug": "acme",
        "name": body["name"],
        "role": "developer",
        "weight": 3,
        "quotas": {
            "active_sessions": {"limit": 4, "used": 2},
            "open_tasks": {"limit": 500, "used": 11},
            "tasks_per_session": {"limit": settings.MAX_TASKS_PER_SESSION},
            "max_priority": {"admin": 9, "operator": 7, "developer": 5},
        },
    }


def test_a_viewer_sees_the_tenant_too(db):
    viewer = member_client("acme", "victor", Membership.Role.VIEWER)

    body = viewer.get(TENANT).json()

    assert (body["role"], body["weight"]) == ("viewer", 1)


def test_a_member_of_several_tenants_names_one(db):
    alice = member_client("acme", "alice")
    member_client("globex", "alice", Membership.Role.OPERATOR)
    set_quotas("globex", weight=5)

    assert error_of(alice.get(TENANT), 400)["details"] == {"tenant": ["you belong to several tenants; name one"]}
    body = alice.get(TENANT, {"tenant": "globex"}).json()
    assert (body["slug"], body["role"], body["weight"]) == ("globex", "operator", 5)


@pytest.mark.parametrize("slug", ["initech", "a\x00b", "not a slug", "x" * 65])
def test_tenant_refuses_a_tenant_not_the_callers_or_not_a_slug(api, slug):
    member_client("initech", "ian")

    assert "tenant" in error_of(api.get(TENANT, {"tenant": slug}), 400)["details"]


def test_tenant_needs_credentials_and_a_membership(db):
    assert error_of(APIClient().get(TENANT), 401)
    assert error_of(staff_client().get(TENANT), 403)


def test_the_schema_describes_the_tenant_answer_and_the_429(client, db):
    schema = client.get("/api/schema/", {"format": "json"}).json()
    components = schema["components"]["schemas"]

    ok = schema["paths"]["/api/v1/tenant/"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Tenant"}
    assert set(components["Tenant"]["properties"]) == {"slug", "name", "role", "weight", "quotas"}
    assert set(components["Quotas"]["properties"]) == {
        "active_sessions",
        "open_tasks",
        "tasks_per_session",
        "max_priority",
    }
    for path, method in [
        ("/api/v1/sessions/", "post"),
        ("/api/v1/sessions/{id}/retry/", "post"),
        ("/api/v1/decompositions/preview/", "post"),
    ]:
        assert "429" in schema["paths"][path][method]["responses"], path


def test_the_tenant_answer_and_a_429_validate_against_the_schema(api, client):
    schema = client.get("/api/schema/", {"format": "json"}).json()
    paths = schema["paths"]
    components = {"components": schema["components"]}
    set_quotas(max_active_sessions=1)
    create(api)

    def body_schema(path: str, method: str, status: str) -> dict:
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"] | components

    jsonschema.validate(api.get(TENANT).json(), body_schema("/api/v1/tenant/", "get", "200"))
    refused = create(api)
    assert refused.status_code == 429
    jsonschema.validate(refused.json(), body_schema("/api/v1/sessions/", "post", "429"))


# The admin


def tenant_form(admin_client, tenant: Tenant, **changes) -> dict:
    from tests.test_admin import change_form

    return change_form(admin_client, f"/admin/tenants/tenant/{tenant.pk}/change/", **changes)


QUOTA_FIELDS = {
    "max_active_sessions": "7",
    "max_open_tasks": "70",
    "max_tasks_per_session": "10",
    "max_priority_developer": "3",
    "max_priority_operator": "8",
    "max_priority_admin": "9",
    "weight": "4",
}


def test_the_admin_change_form_saves_the_quotas_and_the_weight(admin_client, db):
    tenant = Tenant.objects.create(slug="t", name="T")

    form = tenant_form(admin_client, tenant, **QUOTA_FIELDS)
    response = admin_client.post(f"/admin/tenants/tenant/{tenant.pk}/change/", form)

    assert response.status_code == 302
    saved = Tenant.objects.filter(pk=tenant.pk).values(*QUOTA_FIELDS).get()
    assert saved == {name: int(value) for name, value in QUOTA_FIELDS.items()}
    tenant.refresh_from_db()
    assert (tenant.active_sessions_limit(), tenant.max_priority_of("developer")) == (7, 3)


def test_the_admin_empties_a_quota_back_to_the_settings_default(admin_client, db, settings):
    tenant = Tenant.objects.create(slug="t", name="T", max_active_sessions=3)

    form = tenant_form(admin_client, tenant, max_active_sessions="")
    assert admin_client.post(f"/admin/tenants/tenant/{tenant.pk}/change/", form).status_code == 302

    tenant.refresh_from_db()
    assert tenant.max_active_sessions is None
    assert tenant.active_sessions_limit() == settings.QUOTA_ACTIVE_SESSIONS


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_active_sessions", "-1"),
        ("max_open_tasks", "-5"),
        ("max_tasks_per_session", "0"),
        ("max_tasks_per_session", "100000"),  # above MAX_TASKS_PER_SESSION
        ("max_priority_developer", "10"),
        ("max_priority_operator", "-1"),
        ("max_priority_admin", "nine"),
        ("weight", "0"),
        ("weight", "-2"),
        ("weight", ""),
    ],
)
def test_the_admin_refuses_a_bad_quota_and_saves_nothing(admin_client, db, field, value):
    tenant = Tenant.objects.create(slug="t", name="T")
    before = Tenant.objects.filter(pk=tenant.pk).values().get()

    form = tenant_form(admin_client, tenant, **{**QUOTA_FIELDS, field: value})
    response = admin_client.post(f"/admin/tenants/tenant/{tenant.pk}/change/", form)

    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert Tenant.objects.filter(pk=tenant.pk).values().get() == before


def test_the_admins_retry_action_reports_a_full_quota_and_leaves_the_session(admin_client, api):
    from tests.test_admin import run_action

    session = failed_session(api)
    set_quotas(max_active_sessions=1)
    create(api)

    response = run_action(admin_client, "retry_sessions", session)

    assert response.status_code == 200
    assert "quota active_sessions exceeded" in response.content.decode()
    session.refresh_from_db()
    assert (session.status, session.retry_count) == (Session.Status.FAILED, 0)
