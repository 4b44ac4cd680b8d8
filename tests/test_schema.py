"""The OpenAPI schema is the contract other-language clients are written against: it is
served, valid, warning-free, and carries every field of the create request and of the objects."""

import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml
from django.core.management import call_command
from django.urls import get_resolver
from drf_spectacular.generators import SchemaGenerator

CREATE_FIELDS = {"title", "requirements", "priority", "timeout_seconds", "max_retries", "metadata", "tasks"}
TASK_SPEC_FIELDS = {"key", "title", "capability", "depends_on", "required", "instructions", "params"}


@pytest.fixture
def schema(client, db) -> dict:
    response = client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def create_request_schema(schema: dict) -> dict:
    body = schema["paths"]["/api/v1/sessions/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return resolve(schema, body)


def test_schema_is_served_without_authentication(client, db):
    response = client.get("/api/schema/")

    assert response.status_code == 200
    assert yaml.safe_load(response.content)["openapi"].startswith("3.")


def test_api_docs_page_is_served(client, db):
    response = client.get("/api/docs/")

    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


def test_create_request_schema_has_every_contract_field(schema):
    create = create_request_schema(schema)

    assert set(create["properties"]) >= CREATE_FIELDS
    assert create["required"] == ["requirements"]
    assert create["properties"]["priority"]["minimum"] == 0
    assert create["properties"]["priority"]["maximum"] == 9
    task_spec = resolve(schema, create["properties"]["tasks"]["items"])
    assert set(task_spec["properties"]) >= TASK_SPEC_FIELDS
    assert set(task_spec["required"]) == {"key", "title", "capability"}
    assert task_spec["properties"]["depends_on"]["type"] == "array"
    capability = resolve(schema, task_spec["properties"]["capability"])
    assert "code_generation" in capability["enum"]
    assert "mind_reading" not in capability["enum"]


def test_create_documents_the_idempotency_key_header(schema):
    parameters = schema["paths"]["/api/v1/sessions/"]["post"]["parameters"]

    assert {"in": "header", "name": "Idempotency-Key"}.items() <= parameters[0].items()


def test_response_objects_carry_the_contract_fields(schema):
    components = schema["components"]["schemas"]

    assert {"id", "status", "version", "priority", "created_at", "task_counts", "console_url"} <= set(
        components["Session"]["properties"]
    )
    console_url = components["Session"]["properties"]["console_url"]
    assert (console_url["type"], console_url["format"]) == ("string", "uri")
    assert {"id", "key", "status", "capability", "depends_on", "agent", "attempts", "result", "error"} <= set(
        components["Task"]["properties"]
    )
    assert {"id", "from_status", "to_status", "reason", "created_at"} <= set(components["Event"]["properties"])
    by_page, by_cursor = components["PaginatedSessionList"]["anyOf"]
    assert {"count", "next", "previous", "results"} <= set(by_page["properties"])
    assert {"next", "previous", "results"} == set(by_cursor["properties"])


@pytest.mark.parametrize("action", ["start", "pause", "resume", "cancel", "retry"])
def test_transitions_are_documented_as_202(schema, action):
    operation = schema["paths"][f"/api/v1/sessions/{{id}}/{action}/"]["post"]

    assert "202" in operation["responses"]
    assert "requestBody" not in operation


def operations(schema):
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            yield f"{method.upper()} {path}", operation


def test_every_operation_has_a_summary_and_a_description_of_its_own(schema):
    described_by: dict[str, str] = {}
    for where, operation in operations(schema):
        assert operation.get("summary"), f"{where} has no summary"
        assert operation.get("description"), f"{where} has no description"
        first = described_by.setdefault(operation["description"], where)
        assert first == where, f"{where} repeats the description of {first}"


def test_operation_descriptions_are_written_for_clients_not_taken_from_docstrings(schema):
    # Without a description of its own, drf-spectacular shows the view's docstring, which is
    # written for the people who maintain the view.
    resolver = get_resolver()
    views = {pattern.callback for pattern in _flatten(resolver.url_patterns)}
    docstrings = {
        inspect.getdoc(cls)
        for view in views
        for cls in (getattr(view, "cls", None) or getattr(view, "view_class", None),)
        if cls is not None and inspect.getdoc(cls)
    }
    assert docstrings, "no view docstrings found: the check would pass vacuously"
    for where, operation in operations(schema):
        assert operation["description"] not in docstrings, f"{where} shows its view's docstring"


def _flatten(patterns):
    for pattern in patterns:
        if hasattr(pattern, "url_patterns"):
            yield from _flatten(pattern.url_patterns)
        else:
            yield pattern


def test_spectacular_command_validates_without_warnings(db, tmp_path):
    target = tmp_path / "schema.yaml"

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))

    written = yaml.safe_load(target.read_text())
    assert "/api/v1/sessions/{id}/events/" in written["paths"]
    assert set(create_request_schema(written)["properties"]) >= CREATE_FIELDS


def test_a_tasks_agent_is_nullable_as_an_unclaimed_task_has_none(schema):
    assert schema["components"]["schemas"]["Task"]["properties"]["agent"]["nullable"] is True


def test_every_operation_documents_its_client_errors_in_the_one_error_shape(schema):
    error = schema["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert error["properties"]["error"]["required"] == ["code", "message", "details"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            content = operation["responses"]["4XX"]["content"]["application/json"]
            assert content["schema"] == {"$ref": "#/components/schemas/Error"}, (method, path)


def test_the_session_list_documents_both_ways_of_paging(schema):
    pages = schema["components"]["schemas"]["PaginatedSessionList"]["anyOf"]

    assert [page["required"] for page in pages] == [["count", "count_exact", "results"], ["results"]]
    tasks = schema["paths"]["/api/v1/sessions/{id}/tasks/"]["get"]["responses"]["200"]["content"]
    assert tasks["application/json"]["schema"] == {"$ref": "#/components/schemas/PaginatedTaskList"}


def test_one_sessions_endpoints_take_no_list_filters(schema):
    for path in ("/api/v1/sessions/{id}/tasks/", "/api/v1/sessions/{id}/events/", "/api/v1/sessions/{id}/checkpoints/"):
        names = {parameter["name"] for parameter in schema["paths"][path]["get"]["parameters"]}
        assert not names & {"status", "priority", "created_after", "created_before", "search"}, path


def test_requests_at_once_generate_the_schema_one_at_a_time(live_server, monkeypatch):
    """drf-spectacular's generator is not thread-safe (api/schema.py): the live server answers
    each request in a thread, as gunicorn's --threads does, and four requests at once must each
    get the schema, generated one after another. The generator is watched (and slowed, so that
    any overlap shows), not replaced."""
    generate = SchemaGenerator.get_schema
    at_once, most = 0, 0
    count = threading.Lock()

    def watched(self, *args, **kwargs):
        nonlocal at_once, most
        with count:
            at_once += 1
            most = max(most, at_once)
        try:
            time.sleep(0.2)
            return generate(self, *args, **kwargs)
        finally:
            with count:
                at_once -= 1

    monkeypatch.setattr(SchemaGenerator, "get_schema", watched)
    url = f"{live_server.url}/api/schema/?format=json"
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: httpx.get(url, timeout=60), range(4)))

    assert [answer.status_code for answer in answers] == [200] * 4
    assert most == 1
