"""Decomposition through the API: the preview endpoint stores nothing, a session sent
without tasks is decomposed, templates are named or inferred, estimates are validated and stored,
and the session detail carries the critical path by expected duration."""

from itertools import pairwise

import pytest
from rest_framework.test import APIClient

from sessions.models import Session, SessionEvent
from tasks.decomposition import TEMPLATE_NAMES
from tasks.models import Task
from tenants.models import Membership
from tests.conftest import dag_payload, error_of, member_client

SESSIONS = "/api/v1/sessions/"
PREVIEW = "/api/v1/decompositions/preview/"
ENDPOINTS = [PREVIEW, SESSIONS]
PREVIEW_FIELDS = {
    "template",
    "analysis",
    "tasks",
    "edges",
    "topological_order",
    "critical_path",
    "estimated_makespan_hours",
}
DEMO_REQUIREMENTS = "Add per-client rate limiting to the payments API, with tests and docs."


def assert_nothing_written() -> None:
    assert Session.objects.count() == 0
    assert Task.objects.count() == 0
    assert SessionEvent.objects.count() == 0


def estimate(o: float, m: float, p: float) -> dict:
    return {"optimistic": o, "likely": m, "pessimistic": p}


def task(key: str, *depends_on: str, hours: tuple | None = None, **fields) -> dict:
    spec = {"key": key, "title": key.title(), "capability": "code_generation", "depends_on": list(depends_on)}
    if hours is not None:
        spec["estimate"] = estimate(*hours)
    return {**spec, **fields}


# b -> c -> d has the most hops; a -> d the longest expected duration.
UNEQUAL_DAG = [
    task("a", hours=(8, 10, 12)),
    task("b", hours=(1, 1, 1)),
    task("c", "b", hours=(1, 1, 1)),
    task("d", "a", "c", hours=(0.5, 1, 1.5)),
]


# Preview


def test_preview_of_plain_requirements_returns_the_dag_and_stores_nothing(api):
    response = api.post(PREVIEW, {"requirements": DEMO_REQUIREMENTS}, format="json")

    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == PREVIEW_FIELDS
    assert body["template"] == "feature"
    assert body["analysis"]["complexity"] == "medium"
    assert {"add", "api", "tests", "docs"} <= set(body["analysis"]["keywords"])
    assert "security_audit" in body["analysis"]["capabilities"]  # rate limiting asks for a security review
    keys = [t["key"] for t in body["tasks"]]
    assert keys[0] == "design"
    assert "security_review" in keys
    assert_nothing_written()


def test_preview_edges_order_and_critical_path_agree_with_the_tasks(api):
    body = api.post(PREVIEW, {"requirements": DEMO_REQUIREMENTS}, format="json").json()

    by_key = {t["key"]: t for t in body["tasks"]}
    assert sorted(map(tuple, body["edges"])) == sorted(
        (dep, t["key"]) for t in body["tasks"] for dep in t["depends_on"]
    )
    order = body["topological_order"]
    assert sorted(order) == sorted(by_key)
    assert all(order.index(up) < order.index(down) for up, down in body["edges"])
    path = body["critical_path"]
    assert all([up, down] in body["edges"] for up, down in pairwise(path))
    assert body["estimated_makespan_hours"] == pytest.approx(sum(by_key[k]["expected_hours"] for k in path), abs=0.05)
    for planned in body["tasks"]:
        e = planned["estimate"]
        assert planned["expected_hours"] == pytest.approx(
            (e["optimistic"] + 4 * e["likely"] + e["pessimistic"]) / 6, abs=0.01
        )
        assert "> " + DEMO_REQUIREMENTS in planned["instructions"]


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_preview_with_a_named_template_uses_it(api, template):
    body = api.post(PREVIEW, {"requirements": "Do the work", "template": template}, format="json").json()

    assert body["template"] == template
    assert len(body["tasks"]) >= 6
    assert Session.objects.count() == 0


def test_preview_of_an_explicit_dag_keeps_it_and_ranks_by_expected_duration(api):
    response = api.post(PREVIEW, {"requirements": "Four tasks", "tasks": UNEQUAL_DAG}, format="json")

    body = response.json()
    assert response.status_code == 200, body
    assert body["template"] == ""
    assert [t["key"] for t in body["tasks"]] == ["a", "b", "c", "d"]
    assert body["tasks"][0]["estimate"] == estimate(8, 10, 12)
    assert body["critical_path"] == ["a", "d"]
    assert body["estimated_makespan_hours"] == 11.0
    assert sorted(map(tuple, body["edges"])) == [("a", "d"), ("b", "c"), ("c", "d")]
    assert_nothing_written()


def test_preview_of_an_explicit_dag_without_estimates_counts_an_hour_per_task(api):
    body = api.post(PREVIEW, dag_payload(), format="json").json()

    assert body["critical_path"] == ["design", "api", "review", "docs"]
    assert body["estimated_makespan_hours"] == 4.0
    assert body["tasks"][0]["estimate"] == estimate(1, 1, 1)


def test_a_viewer_may_preview_but_not_create(db):
    viewer = member_client("acme", "victor", Membership.Role.VIEWER)

    assert viewer.post(PREVIEW, {"requirements": DEMO_REQUIREMENTS}, format="json").status_code == 200
    error_of(viewer.post(SESSIONS, {"requirements": DEMO_REQUIREMENTS}, format="json"), 403)
    assert_nothing_written()


def test_preview_without_a_token_is_401(db):
    error_of(APIClient().post(PREVIEW, {"requirements": DEMO_REQUIREMENTS}, format="json"), 401)


def test_preview_by_a_user_without_membership_is_403(db):
    from django.contrib.auth import get_user_model

    from tokens.services import issue_token

    loner = get_user_model().objects.create(username="loner")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {issue_token(loner)[1]}")

    error_of(client.post(PREVIEW, {"requirements": DEMO_REQUIREMENTS}, format="json"), 403)


def test_preview_naming_a_tenant_of_someone_else_is_400(api):
    member_client("globex", "bob")

    error = error_of(api.post(PREVIEW, {"requirements": "x", "tenant": "globex"}, format="json"), 400)

    assert "tenant" in error["details"]


def test_preview_matches_what_create_stores(api):
    body = {"requirements": DEMO_REQUIREMENTS, "title": "Rate limits"}
    preview = api.post(PREVIEW, body, format="json").json()
    created = api.post(SESSIONS, body, format="json").json()

    session = Session.objects.get(pk=created["id"])
    assert session.template == preview["template"]
    stored = {t.key: t for t in session.tasks.prefetch_related("depends_on")}
    assert list(stored) == [t["key"] for t in preview["tasks"]]
    for planned in preview["tasks"]:
        row = stored[planned["key"]]
        assert row.capability == planned["capability"]
        assert row.required == planned["required"]
        assert row.instructions == planned["instructions"]
        assert [d.key for d in row.depends_on.all()] == sorted(planned["depends_on"], key=list(stored).index)
        assert (row.estimate_optimistic_h, row.estimate_likely_h, row.estimate_pessimistic_h) == tuple(
            planned["estimate"].values()
        )
    assert created["critical_path"] == preview["critical_path"]
    assert created["estimated_makespan_hours"] == preview["estimated_makespan_hours"]


# Create


def test_create_without_tasks_decomposes_by_the_inferred_template(api):
    response = api.post(SESSIONS, {"requirements": "Fix the bug where checkout crashes on empty carts"}, format="json")

    assert response.status_code == 201, response.content
    session = Session.objects.get(pk=response.json()["id"])
    assert session.template == "bugfix"
    stored = dict(session.tasks.values_list("key", "capability"))
    assert stored["reproduce"] == "debugging"
    assert stored["fix"] == "bug_fixing"
    assert session.tasks.get(key="verify").depends_on.count() == 2
    assert not session.tasks.get(key="release_note").required


def test_create_with_a_named_template_uses_it(api):
    response = api.post(
        SESSIONS, {"requirements": "Fix the bug where checkout crashes", "template": "crud_api"}, format="json"
    )

    assert response.status_code == 201, response.content
    session = Session.objects.get(pk=response.json()["id"])
    assert session.template == "crud_api"
    assert session.tasks.filter(key="endpoints").exists()


def test_create_with_an_explicit_dag_has_no_template(api):
    body = api.post(SESSIONS, dag_payload(), format="json").json()

    assert body["template"] == ""
    assert Session.objects.get(pk=body["id"]).template == ""


def test_create_stores_per_task_estimates_and_defaults_to_one_hour(api):
    payload = {"requirements": "Two tasks", "tasks": [task("a", hours=(0.5, 2, 6)), task("b", "a")]}

    body = api.post(SESSIONS, payload, format="json").json()

    a, b = Task.objects.filter(session_id=body["id"]).order_by("position")
    assert (a.estimate_optimistic_h, a.estimate_likely_h, a.estimate_pessimistic_h) == (0.5, 2, 6)
    assert (b.estimate_optimistic_h, b.estimate_likely_h, b.estimate_pessimistic_h) == (1, 1, 1)
    assert a.expected_hours == pytest.approx((0.5 + 8 + 6) / 6)


def test_session_detail_has_the_critical_path_by_expected_duration(api):
    created = api.post(SESSIONS, {"requirements": "Four tasks", "tasks": UNEQUAL_DAG}, format="json").json()

    body = api.get(f"{SESSIONS}{created['id']}/").json()

    assert body["critical_path"] == ["a", "d"]
    assert body["estimated_makespan_hours"] == 11.0
    assert created["critical_path"] == ["a", "d"]


def test_session_list_leaves_the_critical_path_out(api):
    api.post(SESSIONS, {"requirements": "Four tasks", "tasks": UNEQUAL_DAG}, format="json")

    row = api.get(SESSIONS).json()["results"][0]

    assert "critical_path" not in row
    assert row["template"] == ""


def test_create_of_a_template_larger_than_the_task_limit_is_400(api, settings):
    settings.MAX_TASKS_PER_SESSION = 3

    for endpoint in ENDPOINTS:
        error = error_of(api.post(endpoint, {"requirements": "Fix the crash"}, format="json"), 400)
        assert "maximum of 3" in error["details"]["template"][0]
    assert_nothing_written()


# Bad input, on both endpoints


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("name", ["waterfall", "", "FEATURE", 7, None, ["feature"]])
def test_unknown_template_is_400_listing_the_known_ones(api, endpoint, name):
    error = error_of(api.post(endpoint, {"requirements": "Do it", "template": name}, format="json"), 400)

    assert list(error["details"]) == ["template"]
    assert error["code"] == "invalid"
    if name not in (None, ["feature"]):
        assert all(known in error["message"] for known in TEMPLATE_NAMES)
    assert_nothing_written()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_template_together_with_tasks_is_400(api, endpoint):
    error = error_of(api.post(endpoint, dag_payload(template="feature"), format="json"), 400)

    assert list(error["details"]) == ["template"]
    assert_nothing_written()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("requirements", ["", "   \n\t ", None, 42], ids=["empty", "blank", "null", "number"])
def test_empty_or_wrong_typed_requirements_are_400(api, endpoint, requirements):
    error = error_of(api.post(endpoint, {"requirements": requirements}, format="json"), 400)

    assert list(error["details"]) == ["requirements"]
    assert_nothing_written()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_missing_requirements_are_400(api, endpoint):
    error = error_of(api.post(endpoint, {"template": "feature"}, format="json"), 400)

    assert "requirements" in error["details"]
    assert_nothing_written()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_oversize_requirements_are_400(api, endpoint, settings):
    settings.MAX_TEXT_CHARS = 100

    error = error_of(api.post(endpoint, {"requirements": "fix " * 26}, format="json"), 400)

    assert error["details"] == {"requirements": ["at most 100 characters"]}
    assert_nothing_written()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_requirements_at_the_size_limit_are_decomposed(api, endpoint, settings):
    settings.MAX_TEXT_CHARS = 100
    requirements = ("Fix the crash. " * 7)[:100]

    response = api.post(endpoint, {"requirements": requirements}, format="json")

    assert response.status_code in (200, 201), response.content


def requirements_with(*specs: dict) -> dict:
    return {"requirements": "Do the thing", "tasks": list(specs)}


MALFORMED_DAGS = [
    (requirements_with(task("a", "b"), task("b", "a")), "tasks[0].depends_on", "dependency cycle: a -> b -> a"),
    (requirements_with(task("a"), task("b", "nope")), "tasks[1].depends_on[0]", "unknown task key 'nope'"),
    (requirements_with(task("a", "a")), "tasks[0].depends_on[0]", "itself"),
    (requirements_with(task("a"), task("a")), "tasks[1].key", "duplicate task key 'a'"),
    (requirements_with(task("a", capability="mind_reading")), "tasks[0].capability", "mind_reading"),
    (requirements_with(task("a"), task("b", "a", "a")), "tasks[1].depends_on[1]", "listed twice"),
    (requirements_with(task("has space")), "tasks[0].key", ""),
    (requirements_with(task("a", depends="b")), "tasks[0].depends", "unknown field"),
    ({"requirements": "x", "tasks": []}, "tasks", "at least one task"),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(("payload", "path", "fragment"), MALFORMED_DAGS)
def test_malformed_dag_is_400_with_the_field_path_on_both_endpoints(api, endpoint, payload, path, fragment):
    error = error_of(api.post(endpoint, payload, format="json"), 400)

    assert path in error["details"], error["details"]
    assert fragment in error["details"][path][0]
    assert_nothing_written()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_more_tasks_than_the_maximum_is_400_on_both_endpoints(api, endpoint, settings):
    settings.MAX_TASKS_PER_SESSION = 2

    error = error_of(api.post(endpoint, requirements_with(task("a"), task("b"), task("c")), format="json"), 400)

    assert error["details"] == {"tasks": ["3 tasks exceed the maximum of 2 per session"]}
    assert_nothing_written()


BAD_ESTIMATES = [
    (estimate(3, 2, 4), "tasks[0].estimate.likely", "at least optimistic"),
    (estimate(1, 5, 4), "tasks[0].estimate.pessimistic", "at least likely"),
    (estimate(-1, 2, 4), "tasks[0].estimate.optimistic", "greater than or equal to 0"),
    (estimate("1", 2, 4), "tasks[0].estimate.optimistic", "valid number"),
    (estimate(1, True, 4), "tasks[0].estimate.likely", "valid number"),
    (estimate(1, 2, 10**6), "tasks[0].estimate.pessimistic", "less than or equal to"),
    (estimate(1, 2, 10**400), "tasks[0].estimate.pessimistic", ""),
    ({"optimistic": 1, "likely": 2}, "tasks[0].estimate.pessimistic", "required"),
    ({**estimate(1, 2, 3), "mean": 2}, "tasks[0].estimate.mean", "unknown field"),
    ([1, 2, 3], "tasks[0].estimate", ""),
    ("2h", "tasks[0].estimate", ""),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize(("bad", "path", "fragment"), BAD_ESTIMATES)
def test_bad_estimate_is_400_with_its_path(api, endpoint, bad, path, fragment):
    payload = requirements_with({**task("a"), "estimate": bad})

    error = error_of(api.post(endpoint, payload, format="json"), 400)

    assert path in error["details"], error["details"]
    assert fragment in error["details"][path][0]
    assert_nothing_written()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_equal_and_zero_estimates_are_accepted(api, endpoint):
    payload = requirements_with(task("a", hours=(0, 0, 0)), task("b", "a", hours=(2, 2, 2)))

    response = api.post(endpoint, payload, format="json")

    assert response.status_code in (200, 201), response.content
    assert response.json()["estimated_makespan_hours"] == 2.0


# The contract


@pytest.fixture
def schema(client, db) -> dict:
    return client.get("/api/schema/", {"format": "json"}).json()


def resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node or "allOf" in node:
        if "allOf" in node:  # drf-spectacular wraps a described $ref in allOf
            node = node["allOf"][0]
            continue
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_schema_documents_the_preview_and_the_new_fields(schema):
    operation = schema["paths"][PREVIEW]["post"]
    response = resolve(schema, operation["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(response["properties"]) == PREVIEW_FIELDS
    create = resolve(schema, schema["paths"][SESSIONS]["post"]["requestBody"]["content"]["application/json"]["schema"])
    template = resolve(schema, create["properties"]["template"])
    assert sorted(template["enum"]) == sorted(TEMPLATE_NAMES)
    task_spec = resolve(schema, create["properties"]["tasks"]["items"])
    assert set(resolve(schema, task_spec["properties"]["estimate"])["properties"]) == {
        "optimistic",
        "likely",
        "pessimistic",
    }
    detail = resolve(
        schema,
        schema["paths"][f"{SESSIONS}{{id}}/"]["get"]["responses"]["200"]["content"]["application/json"]["schema"],
    )
    assert {"critical_path", "estimated_makespan_hours", "template"} <= set(detail["properties"])
