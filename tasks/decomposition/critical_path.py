"""Critical path, makespan and topological order of a task DAG, by expected duration.

A task's expected duration is the PERT mean (o + 4m + p) / 6 of its estimate in hours. The
critical path is the chain of dependencies with the largest total expected duration - not the one
with the most hops: one long task can outweigh a chain of short ones. With enough agents, the
makespan (start of the first task to end of the last) is that total.

Pure functions over `Node`s, built from task specs (dicts as the create endpoint takes them) or
from Task rows, so the API, the preview and the benchmarks compute them the same way.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tasks.dag import pert_hours, topological_levels

# A task without an estimate counts as the Task model's default estimate: one hour.
DEFAULT_ESTIMATE = {"optimistic": 1.0, "likely": 1.0, "pessimistic": 1.0}


@dataclass(frozen=True)
class Node:
    key: str
    depends_on: tuple[str, ...]
    hours: float  # expected duration


@dataclass(frozen=True)
class CriticalPath:
    keys: list[str]  # upstream first
    hours: float  # total expected duration along the path: the makespan with enough agents


def nodes_from_specs(specs: Iterable[Mapping]) -> list[Node]:
    """Task specs {"key", "depends_on", "estimate": {"optimistic", "likely", "pessimistic"}}."""
    nodes = []
    for spec in specs:
        estimate = spec.get("estimate") or DEFAULT_ESTIMATE
        hours = pert_hours(estimate["optimistic"], estimate["likely"], estimate["pessimistic"])
        nodes.append(Node(spec["key"], tuple(spec.get("depends_on", ())), hours))
    return nodes


def nodes_from_tasks(tasks: Iterable) -> list[Node]:
    """Task rows; prefetch `depends_on` to keep this at one query for the edges."""
    return [Node(t.key, tuple(dep.key for dep in t.depends_on.all()), t.expected_hours) for t in tasks]


def edges(nodes: Sequence[Node]) -> list[tuple[str, str]]:
    """(upstream, downstream) pairs: the direction work flows."""
    return [(dep, node.key) for node in nodes for dep in node.depends_on]


def topological_order(nodes: Sequence[Node]) -> list[str]:
    """Every key after all of its upstreams; raises tasks.dag.DagError on a cycle."""
    levels = topological_levels({node.key: list(node.depends_on) for node in nodes})
    return [key for level in levels for key in level]


def critical_path(nodes: Sequence[Node]) -> CriticalPath:
    """The dependency chain with the largest total expected duration (ties: the first in topological order)."""
    by_key = {node.key: node for node in nodes}
    finish: dict[str, float] = {}
    previous: dict[str, str | None] = {}
    for key in topological_order(nodes):
        ups = [dep for dep in by_key[key].depends_on if dep in by_key]
        slowest = max(ups, key=lambda dep: finish[dep], default=None)
        previous[key] = slowest
        finish[key] = by_key[key].hours + (finish[slowest] if slowest else 0.0)
    if not finish:
        return CriticalPath([], 0.0)
    end: str | None = max(finish, key=lambda key: finish[key])
    total = finish[end]
    path = []
    while end is not None:
        path.append(end)
        end = previous[end]
    return CriticalPath(path[::-1], total)
