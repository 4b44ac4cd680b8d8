"""Every bad input gets a clear 4xx in the shape {"error": {"code", "message", "details"}},
with the path of the bad field, and leaves nothing behind: no session, no task, no event."""

import json
from urllib.parse import urlencode

import pytest
from rest_framework.test import APIClient

from agents.models import Agent
from sessions.models import Session, SessionEvent
from tasks.models import Task
from tests.conftest import dag_payload, error_of

SESSIONS = "/api/v1/sessions/"
# An id no object has: fixed, so that every pytest-xdist worker collects the same test ids.
UNKNOWN = "5c4a1e58-0f6d-4f35-9d55-7d3c2f0b6a11"


def assert_nothing_written() -> None:
    assert Session.objects.count() == 0
    assert Task.objects.count() == 0
    assert SessionEvent.objects.count() == 0


def post(client: APIClient, payload) -> object:
    return client.post(SESSIONS, payload, format="json")


def post_raw(client: APIClient, body: str | bytes, content_type: str = "application/json", **extra) -> object:
    return client.generic("POST", SESSIONS, body, content_type=content_type, **extra)


def one_task(**fields) -> dict:
    return {"key": "a", "title": "A", "capability": "code_generation", **fields}


def tasks(*specs: dict) -> dict:
    return {"requirements": "Do the thing", "tasks": list(specs)}


# Body that is not the JSON object we expect


@pytest.mark.parametrize(
    "body",
    ['{"title": "x", "requirements": ', "{'requirements': 'single quotes'}", "not json", '{"requirements": NaN}'],
    ids=["truncated", "single-quotes", "plain-text", "nan"],
)
def test_malformed_json_is_400_parse_error(api, body):
    error = error_of(post_raw(api, body), 400)

    assert error["code"] == "parse_error"
    assert "JSON" in error["message"]
    assert_nothing_written()


def test_deeply_nested_json_is_400_not_500(api):
    error = error_of(post_raw(api, "[" * 100_000 + "]" * 100_000), 400)

    assert error["code"] == "parse_error"
    assert_nothing_written()


def test_non_utf8_body_is_400(api):
    error_of(post_raw(api, b'{"requirements": "\xff\xfe"}'), 400)

    assert_nothing_written()


@pytest.mark.parametrize("body", ["[1, 2]", '"just a string"', "42", "null"], ids=["list", "string", "number", "null"])
def test_json_that_is_not_an_object_is_400(api, body):
    error = error_of(post_raw(api, body), 400)

    assert error["code"] == "invalid"
    assert "body" in error["details"] or "requirements" in error["details"]
    assert_nothing_written()


def test_unsupported_content_type_is_415(api):
    error = error_of(post_raw(api, "requirements: yaml", content_type="application/yaml"), 415)

    assert error["code"] == "unsupported_media_type"
    assert_nothing_written()


# Missing, empty and wrong-typed fields


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        ({"title": "no requirements"}, "requirements"),
        ({}, "requirements"),
        ({"requirements": ""}, "requirements"),
        ({"requirements": "   \n\t "}, "requirements"),
        ({"requirements": None}, "requirements"),
        (tasks({"title": "A", "capability": "code_generation"}), "tasks[0].key"),
        (tasks({"key": "a", "capability": "code_generation"}), "tasks[0].title"),
        (tasks({"key": "a", "title": "A"}), "tasks[0].capability"),
    ],
    ids=[
        "no-requirements",
        "empty-object",
        "empty-requirements",
        "blank-requirements",
        "null-requirements",
        "task-without-key",
        "task-without-title",
        "task-without-capability",
    ],
)
def test_missing_or_empty_field_is_400_naming_it(api, payload, path):
    error = error_of(post(api, payload), 400)

    assert error["code"] == "invalid"
    assert path in error["details"]
    assert error["message"].startswith(f"{path}: ")
    assert_nothing_written()


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        (dag_payload(title=123), "title"),
        (dag_payload(requirements=["a", "b"]), "requirements"),
        (dag_payload(priority="5"), "priority"),
        (dag_payload(priority=5.5), "priority"),
        (dag_payload(priority=True), "priority"),
        (dag_payload(timeout_seconds="60"), "timeout_seconds"),
        (dag_payload(max_retries=None), "max_retries"),
        (dag_payload(metadata=["not", "a", "dict"]), "metadata"),
        (dag_payload(tasks={}), "tasks"),
        (dag_payload(tasks="design"), "tasks"),
        (dag_payload(tasks=None), "tasks"),
        (dag_payload(tasks=["design"]), "tasks[0]"),
        (tasks(one_task(required="yes")), "tasks[0].required"),
        (tasks(one_task(required=1)), "tasks[0].required"),
        (tasks(one_task(title=7)), "tasks[0].title"),
        (tasks(one_task(key=5)), "tasks[0].key"),
        (tasks(one_task(instructions=["x"])), "tasks[0].instructions"),
        (tasks(one_task(params="fast")), "tasks[0].params"),
        (tasks(one_task(params={"duration_s": "1"})), "tasks[0].params.duration_s"),
        (tasks(one_task(params={"fail_rate": 2})), "tasks[0].params.fail_rate"),
        (tasks(one_task(params={"duration_s": 10**400})), "tasks[0].params.duration_s"),
        (tasks(one_task(params={"output": 3})), "tasks[0].params.output"),
        (tasks(one_task(max_attempts="3")), "tasks[0].max_attempts"),
        (tasks(one_task(), one_task(key="b", depends_on="a")), "tasks[1].depends_on"),
        (tasks(one_task(), one_task(key="b", depends_on=[1])), "tasks[1].depends_on[0]"),
        (tasks(one_task(), one_task(key="b", depends_on={"a": True})), "tasks[1].depends_on"),
    ],
    ids=[
        "title-int",
        "requirements-list",
        "priority-string",
        "priority-float",
        "priority-bool",
        "timeout-string",
        "max-retries-null",
        "metadata-list",
        "tasks-object",
        "tasks-string",
        "tasks-null",
        "task-not-object",
        "required-string",
        "required-int",
        "task-title-int",
        "task-key-int",
        "instructions-list",
        "params-string",
        "params-duration-string",
        "params-fail-rate-above-1",
        "params-duration-too-big-for-a-float",
        "params-output-int",
        "max-attempts-string",
        "depends-on-string",
        "depends-on-int-item",
        "depends-on-object",
    ],
)
def test_wrong_typed_field_is_400_with_its_path(api, payload, path):
    error = error_of(post(api, payload), 400)

    assert error["code"] == "invalid"
    assert path in error["details"], error["details"]
    assert isinstance(error["details"][path], list) and error["details"][path]
    assert_nothing_written()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("priority", 10),
        ("priority", -1),
        ("priority", 10**30),
        ("timeout_seconds", 0),
        ("timeout_seconds", 10**9),
        ("max_retries", 11),
        ("max_retries", -1),
    ],
)
def test_number_out_of_range_is_400(api, field, value):
    error = error_of(post(api, dag_payload(**{field: value})), 400)

    assert field in error["details"]
    assert_nothing_written()


def test_text_longer_than_max_text_chars_is_400(api, settings):
    settings.MAX_TEXT_CHARS = 100

    long_requirements = error_of(post(api, dag_payload(requirements="x" * 101)), 400)
    long_instructions = error_of(post(api, tasks(one_task(instructions="y" * 101))), 400)
    long_title = error_of(post(api, dag_payload(title="t" * 201)), 400)

    assert "requirements" in long_requirements["details"]
    assert "tasks[0].instructions" in long_instructions["details"]
    assert "title" in long_title["details"]
    assert_nothing_written()


def test_oversize_metadata_is_400(api):
    error = error_of(post(api, dag_payload(metadata={"blob": "z" * 20_000})), 400)

    assert "metadata" in error["details"]
    assert_nothing_written()


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        (dag_payload(requirements="nul \u0000 byte"), "requirements"),
        (dag_payload(metadata={"note": "nul \u0000 byte"}), "metadata"),
        (dag_payload(metadata={"nul \u0000 key": 1}), "metadata"),
        (tasks(one_task(params={"note": "\u0000"})), "tasks[0].params"),
    ],
    ids=["requirements", "metadata-value", "metadata-key", "params"],
)
def test_nul_characters_are_400_not_a_database_error(api, payload, path):
    error = error_of(post(api, payload), 400)

    assert any(key.startswith(path) for key in error["details"]), error["details"]
    assert_nothing_written()


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ('{"requirements": "a\\ud800b"}', "requirements"),
        ('{"requirements": "ok", "metadata": {"k": "\\udfff"}}', "metadata"),
        ('{"requirements": "ok", "metadata": {"\\ud800": 1}}', "metadata"),
        (
            '{"requirements": "ok", "tasks": [{"key": "a", "title": "\\ud800", "capability": "testing"}]}',
            "tasks[0].title",
        ),
        (
            '{"requirements": "ok", "tasks": [{"key": "a", "title": "A", "capability": "testing", '
            '"params": {"x": ["\\ud800"]}}]}',
            "tasks[0].params",
        ),
    ],
    ids=["requirements", "metadata-value", "metadata-key", "task-title", "params"],
)
def test_unpaired_surrogates_are_400_not_a_database_error(api, body, path):
    error = error_of(post_raw(api, body), 400)

    assert path in error["details"], error["details"]
    assert_nothing_written()


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


# 800: deep, yet within what the JSON parser takes below the request's own stack (Python's
# recursion limit counts both, and each middleware costs a few frames).
@pytest.mark.parametrize("depth", [33, 500, 800])
def test_metadata_nested_deeper_than_32_levels_is_400_on_metadata(api, depth):
    error = error_of(post_raw(api, json.dumps(dag_payload(metadata=nested(depth)))), 400)

    assert error["code"] == "invalid"
    assert error["details"] == {"metadata": ["nested deeper than 32 levels"]}
    assert_nothing_written()


def test_a_body_nested_deeper_than_the_json_parser_goes_is_a_parse_error(api):
    depth = 5000  # past Python's recursion limit: the parser itself gives up
    body = '{"requirements": "deep", "metadata": ' + '{"a": ' * depth + "{}" + "}" * depth + "}"

    error = error_of(post_raw(api, body), 400)

    assert error["code"] == "parse_error"
    assert error["message"] == "JSON parse error - nested too deeply"
    assert_nothing_written()


def test_metadata_nested_32_levels_is_stored(api):
    response = post(api, dag_payload(metadata=nested(32)))

    assert response.status_code == 201
    assert Session.objects.get().metadata == nested(32)


# The DAG


def test_cyclic_dag_is_400_naming_the_cycle(api):
    payload = tasks(one_task(key="a", depends_on=["b"]), one_task(key="b", depends_on=["a"]))

    error = error_of(post(api, payload), 400)

    assert error["details"] == {"tasks[0].depends_on": ["dependency cycle: a -> b -> a"]}
    assert "a -> b -> a" in error["message"]
    assert_nothing_written()


def test_longer_cycle_behind_a_valid_root_is_named_in_full(api):
    payload = tasks(
        one_task(key="root"),
        one_task(key="x", depends_on=["root", "z"]),
        one_task(key="y", depends_on=["x"]),
        one_task(key="z", depends_on=["y"]),
    )

    error = error_of(post(api, payload), 400)

    assert error["details"] == {"tasks[1].depends_on": ["dependency cycle: x -> z -> y -> x"]}
    assert_nothing_written()


def test_unknown_capability_is_400(api):
    payload = tasks(one_task(), one_task(key="b", capability="mind_reading"))

    error = error_of(post(api, payload), 400)

    assert list(error["details"]) == ["tasks[1].capability"]
    assert "mind_reading" in error["details"]["tasks[1].capability"][0]
    assert_nothing_written()


def test_unknown_dependency_is_400_with_its_index(api):
    payload = tasks(one_task(), one_task(key="b", depends_on=["a", "nope"]))

    error = error_of(post(api, payload), 400)

    assert error["details"] == {"tasks[1].depends_on[1]": ["unknown task key 'nope'"]}
    assert_nothing_written()


def test_self_dependency_is_400(api):
    payload = tasks(one_task(), one_task(key="b", depends_on=["b"]))

    error = error_of(post(api, payload), 400)

    assert error["details"] == {"tasks[1].depends_on[0]": ["task 'b' cannot depend on itself"]}
    assert_nothing_written()


def test_dependency_listed_twice_is_400(api):
    payload = tasks(one_task(), one_task(key="b", depends_on=["a", "a"]))

    error = error_of(post(api, payload), 400)

    assert list(error["details"]) == ["tasks[1].depends_on[1]"]
    assert_nothing_written()


def test_duplicate_task_keys_are_400(api):
    payload = tasks(one_task(), one_task(key="b"), one_task(key="a", title="Again"))

    error = error_of(post(api, payload), 400)

    assert list(error["details"]) == ["tasks[2].key"]
    assert "duplicate task key 'a'" in error["details"]["tasks[2].key"][0]
    assert "tasks[0]" in error["details"]["tasks[2].key"][0]
    assert_nothing_written()


@pytest.mark.parametrize("key", ["", "has space", "-leading-dash", "k" * 65, "semi;colon"])
def test_malformed_task_key_is_400(api, key):
    error = error_of(post(api, tasks(one_task(key=key))), 400)

    assert "tasks[0].key" in error["details"]
    assert_nothing_written()


def test_empty_task_list_is_400(api):
    error = error_of(post(api, dag_payload(tasks=[])), 400)

    assert "tasks" in error["details"]
    assert_nothing_written()


def test_more_tasks_than_the_maximum_is_400(api, settings):
    settings.MAX_TASKS_PER_SESSION = 3
    payload = tasks(*(one_task(key=f"t{i}") for i in range(4)))

    error = error_of(post(api, payload), 400)

    assert error["details"] == {"tasks": ["4 tasks exceed the maximum of 3 per session"]}
    assert_nothing_written()


def test_exactly_the_maximum_number_of_tasks_is_accepted(api, settings):
    settings.MAX_TASKS_PER_SESSION = 3

    response = post(api, tasks(*(one_task(key=f"t{i}") for i in range(3))))

    assert response.status_code == 201
    assert Task.objects.filter(session_id=response.json()["id"]).count() == 3


# Unknown fields


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        (dag_payload(titel="typo"), "titel"),
        (dag_payload(status="completed"), "status"),
        (tasks(one_task(depends=["x"])), "tasks[0].depends"),
        (tasks(one_task(assignee="builder")), "tasks[0].assignee"),
    ],
    ids=["top-level-typo", "read-only-field", "task-typo", "task-assignee"],
)
def test_unknown_field_is_400_naming_it(api, payload, path):
    error = error_of(post(api, payload), 400)

    assert error["details"][path] == ["unknown field"]
    assert_nothing_written()


def test_tenant_the_caller_does_not_belong_to_is_400(api):
    error = error_of(post(api, dag_payload(tenant="globex")), 400)

    assert "tenant" in error["details"]
    assert_nothing_written()


# Size limits


def test_oversize_body_is_413_before_parsing(api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048

    error = error_of(post(api, dag_payload(requirements="x" * 4000)), 413)

    assert error["code"] == "payload_too_large"
    assert "2048" in error["message"]
    assert_nothing_written()


def test_oversize_malformed_body_is_still_413(api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048

    error_of(post_raw(api, "{" * 5000), 413)

    assert_nothing_written()


def test_non_numeric_content_length_is_400(api):
    error = error_of(post_raw(api, json.dumps(dag_payload()), CONTENT_LENGTH="lots"), 400)

    assert "Content-Length" in error["message"]
    assert_nothing_written()


# Unknown ids


@pytest.mark.parametrize(
    "path",
    [
        "{sid}/",
        "{sid}/tasks/",
        "{sid}/events/",
        "{sid}/checkpoints/",
    ],
)
@pytest.mark.parametrize("sid", [UNKNOWN, "not-a-uuid", "123"], ids=["uuid", "garbage", "number"])
def test_unknown_session_id_is_404_on_reads(api, path, sid):
    error = error_of(api.get(SESSIONS + path.format(sid=sid)), 404)

    assert error["code"] == "not_found"


@pytest.mark.parametrize("action", ["start", "pause", "resume", "cancel", "retry"])
@pytest.mark.parametrize("sid", [UNKNOWN, "not-a-uuid"], ids=["uuid", "garbage"])
def test_unknown_session_id_is_404_on_transitions(api, action, sid):
    error = error_of(api.post(f"{SESSIONS}{sid}/{action}/"), 404)

    assert error["code"] == "not_found"
    assert_nothing_written()


@pytest.mark.parametrize(
    "path",
    [
        f"/api/v1/tasks/{UNKNOWN}/",
        "/api/v1/tasks/garbage/",
        "/api/v1/agents/999999/",
        "/api/v1/agents/garbage/",
        "/api/v1/agents/99999999999999999999999999/",
    ],
)
def test_unknown_task_or_agent_id_is_404(api, path):
    assert error_of(api.get(path), 404)["code"] == "not_found"


# Query parameters


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("status=bogus", "status"),
        ("status=queued&status=bogus", "status"),
        ("priority=high", "priority"),
        ("priority=NaN", "priority"),
        ("created_after=yesterday", "created_after"),
        ("created_before=2024-13-45", "created_before"),
        ("search=nul%00byte", "search"),
    ],
)
def test_bad_list_filter_is_400_naming_the_parameter(api, query, param):
    error = error_of(api.get(f"{SESSIONS}?{query}"), 400)

    assert error["code"] == "invalid"
    assert param in error["details"]


def test_out_of_range_priority_filter_matches_nothing(api):
    post(api, dag_payload())

    response = api.get(SESSIONS, {"priority": 10**30})

    assert response.status_code == 200
    assert response.json()["count"] == 0


@pytest.mark.parametrize("after", ["abc", "-1", "1.5", "\u00b2", ""])
def test_bad_after_on_events_is_400(api, after):
    session_id = post(api, dag_payload()).json()["id"]

    error = error_of(api.get(f"{SESSIONS}{session_id}/events/", {"after": after}), 400)

    assert "after" in error["details"]


def test_huge_after_on_events_is_an_empty_page(api):
    session_id = post(api, dag_payload()).json()["id"]

    response = api.get(f"{SESSIONS}{session_id}/events/", {"after": "9" * 30})

    assert response.status_code == 200
    assert response.json()["results"] == []


def test_page_beyond_the_last_is_404(api):
    error_of(api.get(SESSIONS, {"page": 99}), 404)


@pytest.mark.parametrize("path", ["", "{sid}/tasks/", "{sid}/events/", "{sid}/checkpoints/"])
@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"page": 0}, "page"),
        ({"page": -3}, "page"),
        ({"page": "abc"}, "page"),
        ({"page": "\u00b2"}, "page"),
        ({"page": "9" * 30}, "page"),
        ({"page_size": -106}, "page_size"),
        ({"page_size": 0}, "page_size"),
        ({"page_size": "ten"}, "page_size"),
    ],
)
def test_bad_page_or_page_size_is_400_naming_it(api, path, query, param):
    session_id = post(api, dag_payload()).json()["id"]

    error = error_of(api.get(SESSIONS + path.format(sid=session_id), query), 400)

    assert error["code"] == "invalid"
    assert param in error["details"]


def test_bad_page_size_on_the_cursor_list_is_400(api):
    error = error_of(api.get(SESSIONS, {"cursor": "", "page_size": -1}), 400)

    assert "page_size" in error["details"]


@pytest.mark.parametrize(
    "when",
    [
        "4838-06-18T13:43:36+23:39",
        "2000-10-29T01:44:45+23:50",
        "0864-04-18T06:58:09+16:11",
        "0173-11-24T22:53:43-21:08",
    ],
)
def test_a_date_filter_with_any_valid_offset_is_read_in_utc(api, when):
    """PostgreSQL refuses offsets past ±15:59 that Python parses (once a 500 DataError)."""
    post(api, dag_payload())

    after = api.get(SESSIONS, {"created_after": when})
    before = api.get(SESSIONS, {"created_before": when})

    assert after.status_code == before.status_code == 200
    assert after.json()["count"] + before.json()["count"] == 1


@pytest.mark.parametrize("when", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00"])
def test_a_date_filter_with_no_utc_equivalent_is_400(api, when):
    error = error_of(api.get(SESSIONS, {"created_after": when}), 400)

    assert "created_after" in error["details"]


@pytest.mark.parametrize("path", ["{sid}/", "{sid}/tasks/", "{sid}/events/", "{sid}/checkpoints/", "{sid}/cancel/"])
def test_list_filters_do_not_touch_one_sessions_endpoints(api, path):
    """A session's own endpoints read no list filter: ?status=running does not make a pending
    session a 404, and a date PostgreSQL cannot compare does not reach its lookup."""
    session_id = post(api, dag_payload()).json()["id"]
    query = {"status": "running", "created_after": "4838-06-18T13:43:36+23:39", "priority": "high"}

    call = api.post if path.endswith("cancel/") else api.get
    response = call(f"{SESSIONS}{path.format(sid=session_id)}?{urlencode(query)}")

    assert response.status_code in (200, 202), response.content


@pytest.mark.parametrize("method", ["get", "post"])
@pytest.mark.parametrize(
    "path",
    [
        f"{SESSIONS}0.5/start/",
        f"{SESSIONS}0.5/tasks/",
        "/api/v1/tasks/a.b/",
        "/api/v1/nothing/",
        "/api/v1/tokens/d%0A/",
    ],
)
def test_an_api_url_that_names_no_endpoint_is_a_json_404(api, method, path):
    response = getattr(api, method)(path)

    assert response["Content-Type"] == "application/json"
    assert error_of(response, 404)["code"] == "not_found"


# Idempotency-Key


@pytest.mark.parametrize("key", ["k" * 129, ""], ids=["too-long", "empty"])
def test_bad_idempotency_key_is_400_and_writes_nothing(api, key):
    response = api.post(SESSIONS, dag_payload(), format="json", headers={"Idempotency-Key": key})

    error = error_of(response, 400)

    assert "Idempotency-Key" in error["details"]
    assert_nothing_written()


def test_idempotency_key_of_128_characters_is_accepted(api):
    response = api.post(SESSIONS, dag_payload(), format="json", headers={"Idempotency-Key": "k" * 128})

    assert response.status_code == 201
    assert Session.objects.get().idempotency_key == "k" * 128


# Pinning, per-task deadlines and fail-fast


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        (tasks(one_task(timeout_seconds="60")), "tasks[0].timeout_seconds"),
        (tasks(one_task(timeout_seconds=0)), "tasks[0].timeout_seconds"),
        (tasks(one_task(agent=7)), "tasks[0].agent"),
        (tasks(one_task(agent="Has Spaces")), "tasks[0].agent"),
        (tasks(one_task(params={"transient_failures": "2"})), "tasks[0].params.transient_failures"),
        ({"requirements": "Do the thing", "fail_fast": "yes"}, "fail_fast"),
    ],
    ids=["timeout-string", "timeout-zero", "agent-int", "agent-bad-name", "transient-string", "fail-fast-string"],
)
def test_bad_pinning_deadline_or_fail_fast_is_400(api, payload, path):
    error = error_of(post(api, payload), 400)

    assert path in error["details"], error["details"]
    assert_nothing_written()


def test_pinning_to_an_unregistered_agent_is_400(api):
    error = error_of(post(api, tasks(one_task(agent="gpu-box"))), 400)

    assert "no agent named 'gpu-box'" in error["details"]["tasks[0].agent"][0]
    assert_nothing_written()


def test_pinning_to_an_agent_without_the_capability_is_400(api):
    Agent.objects.create(name="reviewer", executor="scripted", capabilities=["code_review"])

    error = error_of(post(api, tasks(one_task(agent="reviewer"))), 400)

    assert "does not have capability 'code_generation'" in error["details"]["tasks[0].agent"][0]
    assert_nothing_written()


def test_every_bad_pin_is_named_with_its_reason(api):
    Agent.objects.create(name="reviewer", executor="scripted", capabilities=["code_review"])
    payload = tasks(
        one_task(key="a", agent="gpu-box"),
        one_task(key="b", agent="reviewer"),
        one_task(key="c", agent="reviewer", capability="code_review"),
    )

    error = error_of(post(api, payload), 400)

    assert error["details"] == {
        "tasks[0].agent": ["no agent named 'gpu-box' is registered"],
        "tasks[1].agent": ["agent 'reviewer' does not have capability 'code_generation'"],
    }
    assert error["message"] == "tasks[0].agent: no agent named 'gpu-box' is registered"
    assert_nothing_written()


def test_a_task_deadline_beyond_the_brokers_visibility_window_is_400(api, settings):
    settings.TASK_DEADLINE_SECONDS = 600

    error = error_of(post(api, tasks(one_task(timeout_seconds=601))), 400)

    assert "TASK_DEADLINE_SECONDS" in error["details"]["tasks[0].timeout_seconds"][0]
    assert_nothing_written()
