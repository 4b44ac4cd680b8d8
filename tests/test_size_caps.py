"""Size caps come before per-item validation: a body with too many items is refused after one
len(), not after validating every item. Measured by counting the items validated (our own
serializers' methods, wrapped with a counter), never by the clock."""

import json

import pytest

from api.inputs import TaskSpecSerializer
from orchestrator_project.validation import StrictCharField
from sessions.models import Session, SessionEvent
from tasks.models import Task
from tests.conftest import error_of

SESSIONS = "/api/v1/sessions/"
PREVIEW = "/api/v1/decompositions/preview/"
ENDPOINTS = [SESSIONS, PREVIEW]


@pytest.fixture
def validated_tasks(monkeypatch) -> list:
    """Every task item TaskSpecSerializer validates, appended as it is validated."""
    seen = []
    real = TaskSpecSerializer.to_internal_value

    def counting(self, data):
        seen.append(data)
        return real(self, data)

    monkeypatch.setattr(TaskSpecSerializer, "to_internal_value", counting)
    return seen


@pytest.fixture
def validated_strings(monkeypatch) -> list:
    """Every strict string validated (depends_on's items among them)."""
    seen = []
    real = StrictCharField.to_internal_value

    def counting(self, data):
        seen.append(data)
        return real(self, data)

    monkeypatch.setattr(StrictCharField, "to_internal_value", counting)
    return seen


def tiny_tasks(count: int) -> list[dict]:
    return [{"key": "1", "title": "t", "capability": "testing"}] * count


def assert_nothing_written() -> None:
    assert Session.objects.count() == 0
    assert Task.objects.count() == 0
    assert SessionEvent.objects.count() == 0


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_21000_tiny_tasks_are_refused_before_any_task_is_validated(api, endpoint, settings, validated_tasks):
    body = json.dumps({"requirements": "Flood", "tasks": tiny_tasks(21_000)}, separators=(",", ":"))
    assert len(body) < settings.DATA_UPLOAD_MAX_MEMORY_SIZE  # within the body cap: the count must refuse it

    error = error_of(api.post(endpoint, body, content_type="application/json"), 400)

    cap = settings.MAX_TASKS_PER_SESSION
    assert error["details"] == {"tasks": [f"21000 tasks exceed the maximum of {cap} per session"]}
    assert validated_tasks == []
    assert_nothing_written()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_one_task_over_the_cap_validates_no_task(api, endpoint, settings, validated_tasks):
    settings.MAX_TASKS_PER_SESSION = 5

    error = error_of(api.post(endpoint, {"requirements": "x", "tasks": tiny_tasks(6)}, format="json"), 400)

    assert error["details"] == {"tasks": ["6 tasks exceed the maximum of 5 per session"]}
    assert validated_tasks == []


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_an_empty_task_list_is_400_before_validation(api, endpoint):
    error = error_of(api.post(endpoint, {"requirements": "x", "tasks": []}, format="json"), 400)

    assert error["details"] == {"tasks": ["send at least one task, or leave tasks out"]}


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_tasks_at_the_cap_are_all_validated_and_accepted(api, endpoint, settings, validated_tasks):
    settings.MAX_TASKS_PER_SESSION = 3
    specs = [{"key": f"t{i}", "title": "t", "capability": "testing"} for i in range(3)]

    response = api.post(endpoint, {"requirements": "x", "tasks": specs}, format="json")

    assert response.status_code in (200, 201), response.content
    assert len(validated_tasks) == 3


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_huge_depends_on_list_is_refused_before_its_items_are_validated(api, endpoint, validated_strings):
    spec = {"key": "a", "title": "t", "capability": "testing", "depends_on": ["b"] * 100_000}

    error = error_of(api.post(endpoint, {"requirements": "x", "tasks": [spec]}, format="json"), 400)

    assert error["details"] == {"tasks[0].depends_on": ["Ensure this field has no more than 500 elements."]}
    assert len(validated_strings) < 10  # the spec's own strings, none of the 100,000
    assert_nothing_written()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_tasks_that_are_not_a_list_are_400(api, endpoint):
    error = error_of(api.post(endpoint, {"requirements": "x", "tasks": {"a": 1}}, format="json"), 400)

    assert "tasks" in error["details"]
    assert_nothing_written()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_megabyte_metadata_is_refused_by_its_size_before_its_entries_are_walked(api, endpoint, monkeypatch):
    walked = []
    monkeypatch.setattr("orchestrator_project.validation.validate_storable_json", walked.append)
    metadata = {str(i): i for i in range(50_000)}  # about 700 kB, under the body cap

    error = error_of(api.post(endpoint, {"requirements": "x", "metadata": metadata}, format="json"), 400)

    assert error["details"] == {"metadata": ["at most 16384 bytes of JSON"]}
    assert walked == []
    assert_nothing_written()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_megabyte_task_params_are_refused_by_their_size(api, endpoint):
    spec = {"key": "a", "title": "t", "capability": "testing", "params": {"x": ["y"] * 200_000}}

    error = error_of(api.post(endpoint, {"requirements": "x", "tasks": [spec]}, format="json"), 400)

    assert error["details"] == {"tasks[0].params": ["at most 16384 bytes of JSON"]}
    assert_nothing_written()
