"""Validation and ordering of a task DAG given as specs: [{"key", "depends_on", ...}]."""

from collections.abc import Mapping, Sequence

from orchestrator_project.validation import InvalidInput


def pert_hours(optimistic: float, likely: float, pessimistic: float) -> float:
    """A task's expected duration: the PERT mean of its estimate."""
    return (optimistic + 4 * likely + pessimistic) / 6


class DagError(InvalidInput):
    """A DAG is malformed; `path` names the offending field, e.g. "tasks[2].depends_on[0]"."""


def validate_dag(specs: Sequence[Mapping]) -> None:
    """Reject duplicate keys, unknown or self dependencies and cycles (naming the cycle)."""
    index_of: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec["key"] in index_of:
            raise DagError(
                f"tasks[{i}].key", f"duplicate task key {spec['key']!r} (first used by tasks[{index_of[spec['key']]}])"
            )
        index_of[spec["key"]] = i
    for i, spec in enumerate(specs):
        seen: set[str] = set()
        for j, dep in enumerate(spec.get("depends_on", [])):
            path = f"tasks[{i}].depends_on[{j}]"
            if dep == spec["key"]:
                raise DagError(path, f"task {dep!r} cannot depend on itself")
            if dep not in index_of:
                raise DagError(path, f"unknown task key {dep!r}")
            if dep in seen:
                raise DagError(path, f"dependency {dep!r} is listed twice")
            seen.add(dep)
    cycle = find_cycle({spec["key"]: list(spec.get("depends_on", [])) for spec in specs})
    if cycle:
        first = index_of[cycle[0]]
        raise DagError(f"tasks[{first}].depends_on", "dependency cycle: " + " -> ".join(cycle))


def find_cycle(deps: Mapping[str, Sequence[str]]) -> list[str] | None:
    """Return one cycle as [a, b, ..., a] (each depends on the next), or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(deps, white)
    for root in deps:
        if colour[root] != white:
            continue
        # Iterative DFS: the path stack doubles as the cycle's witness.
        path: list[str] = [root]
        iters = [iter(deps[root])]
        colour[root] = grey
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                iters.pop()
            elif colour[nxt] == grey:
                return [*path[path.index(nxt) :], nxt]
            elif colour[nxt] == white:
                colour[nxt] = grey
                path.append(nxt)
                iters.append(iter(deps[nxt]))
    return None


def topological_levels(deps: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Group keys by depth: level n holds the keys whose longest upstream chain has n edges.

    Only edges between keys present in `deps` count, so a partial DAG (the unfinished part of a
    session) orders correctly. Keys keep their input order inside a level.
    """
    inside = {key: [d for d in ups if d in deps] for key, ups in deps.items()}
    dependents: dict[str, list[str]] = {key: [] for key in deps}
    for key, ups in inside.items():
        for up in ups:
            dependents[up].append(key)
    waiting = {key: len(ups) for key, ups in inside.items()}
    ready = [key for key, count in waiting.items() if count == 0]
    depth = dict.fromkeys(ready, 0)
    while ready:
        key = ready.pop()
        for down in dependents[key]:
            depth[down] = max(depth.get(down, 0), depth[key] + 1)
            waiting[down] -= 1
            if waiting[down] == 0:
                ready.append(down)
    if len(depth) != len(deps):
        raise DagError("tasks", "dependency cycle among: " + ", ".join(k for k in deps if k not in depth))
    levels: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
    for key in deps:
        levels[depth[key]].append(key)
    return levels
