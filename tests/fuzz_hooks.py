"""Schemathesis hooks for tests/test_fuzz_schema.py, loaded by the schemathesis process it runs
(SCHEMATHESIS_HOOKS). FUZZ_KNOWN_IDS (JSON) holds the ids of the objects the test seeded, by
the collection they belong to: {"sessions": [...], "tasks": [...], "agents": [...]}."""

import itertools
import json
import os

import schemathesis
from hypothesis import strategies as st

KNOWN = json.loads(os.environ.get("FUZZ_KNOWN_IDS", "{}"))


def collection_of(path: str) -> str | None:
    """The collection whose ids a path's parameters name: /api/v1/sessions/{id}/tasks/ names a
    session, /api/v1/tasks/{id}/ and /api/v1/eap/tasks/{task_id}/result/ a task."""
    parts = [part for part in path.split("/") if part]
    for part, following in itertools.pairwise(parts):
        if following.startswith("{") and part in KNOWN:
            return part
    return None


@schemathesis.hook
def flatmap_path_parameters(context, path_parameters: dict) -> st.SearchStrategy:
    """Each path parameter is what schemathesis generated or the id of a seeded object, so
    that cases reach real objects (their tasks, checkpoints, transitions) and not only 404s."""
    known = KNOWN.get(collection_of(context.operation.path) or "", [])
    if not known:
        return st.just(path_parameters)
    return st.fixed_dictionaries({name: st.sampled_from([value, *known]) for name, value in path_parameters.items()})
