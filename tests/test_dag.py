import pytest

from tasks.dag import DagError, find_cycle, topological_levels, validate_dag


def specs(edges: dict[str, list[str]]) -> list[dict]:
    return [{"key": key, "depends_on": deps} for key, deps in edges.items()]


def test_a_valid_diamond_passes():
    validate_dag(specs({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}))


def test_a_cycle_is_named_in_dependency_order():
    with pytest.raises(DagError) as raised:
        validate_dag(specs({"a": ["c"], "b": ["a"], "c": ["b"], "d": []}))

    assert raised.value.path == "tasks[0].depends_on"
    assert "a -> c -> b -> a" in raised.value.message


@pytest.mark.parametrize(
    ("edges", "path", "fragment"),
    [
        ({"a": ["a"]}, "tasks[0].depends_on[0]", "itself"),
        ({"a": [], "b": ["zz"]}, "tasks[1].depends_on[0]", "unknown task key 'zz'"),
        ({"a": [], "b": ["a", "a"]}, "tasks[1].depends_on[1]", "listed twice"),
    ],
)
def test_bad_dependencies_name_the_field(edges, path, fragment):
    with pytest.raises(DagError) as raised:
        validate_dag(specs(edges))

    assert raised.value.path == path
    assert fragment in raised.value.message


def test_duplicate_keys_name_the_second_occurrence():
    with pytest.raises(DagError) as raised:
        validate_dag([{"key": "a", "depends_on": []}, {"key": "b"}, {"key": "a", "depends_on": []}])

    assert raised.value.path == "tasks[2].key"


def test_find_cycle_returns_none_for_a_dag():
    assert find_cycle({"a": [], "b": ["a"], "c": ["a", "b"]}) is None


def test_levels_follow_the_longest_upstream_chain():
    levels = topological_levels({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["a", "d"], "f": []})

    assert levels == [["a", "f"], ["b", "c"], ["d"], ["e"]]


def test_levels_ignore_upstreams_outside_the_partial_dag():
    # "done" already completed, so it is not part of what is left to run.
    assert topological_levels({"b": ["done"], "c": ["b"]}) == [["b"], ["c"]]


def test_a_long_chain_orders_without_recursion_limits():
    keys = [f"t{i}" for i in range(3000)]
    levels = topological_levels({key: keys[i - 1 : i] for i, key in enumerate(keys)})

    assert [level[0] for level in levels] == keys
