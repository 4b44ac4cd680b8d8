"""Decomposition: plain-text requirements become a task DAG (analyzer + templates), and any DAG
gets its topological order, critical path and makespan estimate (critical_path).

`plan_session` is the one entry point the API uses, for both creating and previewing a session.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from tasks.dag import DagError

from .analyzer import Analysis, analyze
from .critical_path import (
    DEFAULT_ESTIMATE,
    CriticalPath,
    critical_path,
    edges,
    nodes_from_specs,
    nodes_from_tasks,
    pert_hours,
    topological_order,
)
from .templates import TEMPLATE_NAMES, TEMPLATES, build_task_specs

__all__ = [
    "DEFAULT_ESTIMATE",
    "TEMPLATE_NAMES",
    "Analysis",
    "CriticalPath",
    "Plan",
    "analyze",
    "critical_path",
    "edges",
    "nodes_from_specs",
    "nodes_from_tasks",
    "pert_hours",
    "plan_session",
    "topological_order",
]


@dataclass(frozen=True)
class Plan:
    template: str  # "" for a DAG the client sent
    requirements: str
    tasks: list[dict]  # task specs as the create endpoint takes them
    chosen_by: Analysis | None = None  # the analysis the template came from

    @property
    def analysis(self) -> Analysis:
        """The requirements' analysis. A client's own DAG does not need one to be created, so
        it is computed only when asked for (the preview shows it)."""
        return self.chosen_by or analyze(self.requirements)


def plan_session(
    *, requirements: str, template: str | None = None, tasks: Sequence[dict] | None = None, max_tasks: int | None = None
) -> Plan:
    """The DAG a session gets: the client's `tasks` if sent, else the named or inferred template's.

    Raises DagError (path "template") for an unknown template, or when the template's DAG has
    more than `max_tasks` tasks.
    """
    if tasks:
        return Plan("", requirements, list(tasks))
    analysis = analyze(requirements)
    name = template or analysis.template
    if name not in TEMPLATES:
        raise DagError("template", f"unknown template {name!r}; known templates: {', '.join(TEMPLATE_NAMES)}")
    specs = build_task_specs(name, analysis)
    if max_tasks is not None and len(specs) > max_tasks:
        raise DagError(
            "template",
            f"the {name} template needs {len(specs)} tasks, more than the maximum of {max_tasks} per session",
        )
    return Plan(name, requirements, specs, chosen_by=analysis)
