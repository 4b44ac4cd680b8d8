"""The task DAGs the benchmarks run, as create_session specs, and their critical paths."""

from typing import Any

from tasks.dag import topological_levels
from tasks.decomposition.critical_path import Node, critical_path

Spec = dict[str, Any]
# One capability for every task: the benchmark's agents all have it, so routing plays no part.
CAPABILITY = "code_generation"


def task(key: str, depends_on: tuple[str, ...] = (), seconds: float = 0.0) -> Spec:
    return {
        "key": key,
        "title": key,
        "capability": CAPABILITY,
        "depends_on": list(depends_on),
        "params": {"duration_s": seconds},
    }


def chain(length: int, seconds: float = 0.0) -> list[Spec]:
    keys = [f"t{i:03d}" for i in range(length)]
    return [task(key, tuple(keys[i - 1 : i]), seconds) for i, key in enumerate(keys)]


def fan(width: int, seconds: float = 0.0) -> list[Spec]:
    """root -> `width` tasks in parallel -> sink."""
    middle = [f"m{i:03d}" for i in range(width)]
    return (
        [task("root", (), seconds)]
        + [task(k, ("root",), seconds) for k in middle]
        + [task("sink", tuple(middle), seconds)]
    )


def makespan_shapes(unit: float) -> dict[str, list[Spec]]:
    """B2: unequal durations where they make the schedule matter, in units of `unit` seconds."""
    return {
        "chain": chain(4, unit),
        "diamond": [
            task("a", (), unit),
            task("b", ("a",), 2 * unit),
            task("c", ("a",), unit),
            task("d", ("b", "c"), unit),
        ],
        "wide": fan(8, unit),
        # Not series-parallel: a barrier after {A, B} would make C wait for B.
        "non_sp": [
            task("A", (), unit),
            task("B", (), 3 * unit),
            task("C", ("A",), 3 * unit),
            task("D", ("A", "B"), unit),
        ],
    }


def widest_level(specs: list[Spec]) -> int:
    """How many tasks can run at once at most, counting by dependency depth."""
    return max(len(level) for level in topological_levels({s["key"]: s["depends_on"] for s in specs}))


def critical_path_s(specs: list[Spec]) -> float:
    """The longest sum of durations along any path: the makespan with unlimited workers and no
    overhead. The same computation the API uses, with each task's sleep as its duration."""
    nodes = [Node(s["key"], tuple(s["depends_on"]), s["params"]["duration_s"]) for s in specs]
    return critical_path(nodes).hours
