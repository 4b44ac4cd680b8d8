"""Compile a session's unfinished task DAG into a Celery canvas, exactly where canvas can say it.

A series-parallel (SP) DAG is a single task, tasks in parallel (a group) or parts in series (a
chain), recursively. Those compile exactly: a group followed by anything in a chain becomes a
chord, so nothing waits for an unrelated task:

    design -> (api, ui) -> review          chain(design, group(api, ui), review, finalize)
                                           = chain(design, chord([api, ui], chain(review, finalize)))

A part that is not SP (e.g. A->C, A->D, B->D: D needs both, C only A) would need a barrier in
canvas - C would wait for B. Such a part, and everything after it in series, is instead released
from the database: run_task sends a task's message when its last upstream completes
(release.release_dependents). See docs/CANVAS.md.
"""

import operator
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce

from celery import chain, chord, current_app, group
from celery.canvas import Signature, _chain

from sessions.models import Session

from . import fairshare, statements
from .dag import topological_levels
from .messages import FINALIZE_SESSION, RUN_TASK, backlog_priority, message, run_task_options
from .models import Task

# An SP expression: a task key, ("chain", [parts]) or ("group", [parts]).
Expr = str | tuple[str, list]


@dataclass
class Plan:
    canvas: Expr | None
    released: set[str] = field(default_factory=set)


class _Graph:
    def __init__(self, deps: Mapping[str, Sequence[str]]):
        self.order = list(deps)
        self.ups = {k: {d for d in deps[k] if d in deps} for k in self.order}
        self.downs: dict[str, set[str]] = {k: set() for k in self.order}
        for key, ups in self.ups.items():
            for up in ups:
                self.downs[up].add(key)
        topo = [key for level in topological_levels(deps) for key in level]
        self.desc = self._closure(self.downs, reversed(topo))
        self.anc = self._closure(self.ups, topo)

    @staticmethod
    def _closure(edges: dict[str, set[str]], order) -> dict[str, frozenset[str]]:
        """Everything reachable along `edges`; `order` visits a node after all its targets."""
        result: dict[str, frozenset[str]] = {}
        for node in order:
            result[node] = frozenset(edges[node]).union(*(result[t] for t in edges[node]))
        return result

    def components(self, nodes: frozenset[str]) -> list[frozenset[str]]:
        """Weakly connected components of `nodes`, in input order."""
        left, parts = set(nodes), []
        for start in (k for k in self.order if k in nodes):
            if start not in left:
                continue
            part, stack = set(), [start]
            while stack:
                node = stack.pop()
                if node in left:
                    left.discard(node)
                    part.add(node)
                    stack.extend((self.ups[node] | self.downs[node]) & nodes)
            parts.append(frozenset(part))
        return parts

    def is_connected(self, nodes: frozenset[str]) -> bool:
        # With a single source every node descends from it (walk up from any node within
        # `nodes`): connected without a search. That is every step of a chain.
        sources = [k for k in nodes if not (self.ups[k] & nodes)]
        return len(sources) == 1 or len(self.components(nodes)) == 1

    def first_series_part(self, nodes: frozenset[str]) -> frozenset[str] | None:
        """The smallest down-closed P such that every other node descends from all of P.

        Grow P from the sources: a node that does not descend from every member of P cannot come
        after P, so it joins P (with its ancestors). If P swallows everything, there is no series
        cut and the (connected) part is not SP.
        """
        part = {k for k in nodes if not (self.ups[k] & nodes)}
        while True:
            after = set(nodes - part)
            for member in part:
                after &= self.desc[member]
            missing = nodes - part - after
            if not missing:
                return frozenset(part) if after else None
            for node in missing:
                part |= {node} | (self.anc[node] & nodes)


def plan_dag(deps: Mapping[str, Sequence[str]], blocked: set[str] = frozenset()) -> Plan:
    """Split a DAG into an exact SP canvas and the keys the database must release.

    `blocked` keys wait on something outside the DAG that is still running (after a resume);
    they and their descendants are released from the database.
    """
    graph = _Graph(deps)
    released = set(blocked)
    for key in blocked:
        released |= graph.desc[key]
    expr, more = _compile(graph, frozenset(k for k in graph.order if k not in released))
    return Plan(expr, released | more)


def _compile(graph: _Graph, nodes: frozenset[str]) -> tuple[Expr | None, set[str]]:
    if not nodes:
        return None, set()
    if len(nodes) == 1:
        return next(iter(nodes)), set()
    components = graph.components(nodes)
    if len(components) > 1:
        compiled = [_compile(graph, c) for c in components]
        exprs = [e for e, _ in compiled if e is not None]
        released = set().union(*(r for _, r in compiled))
        return (("group", exprs) if len(exprs) > 1 else exprs[0] if exprs else None), released
    return _compile_series(graph, nodes)


def _compile_series(graph: _Graph, nodes: frozenset[str]) -> tuple[Expr | None, set[str]]:
    steps: list[Expr] = []
    rest = nodes
    while rest:
        # A single node or a disconnected remainder (parallel parts) is the last step of the chain.
        last = len(rest) == 1 or not graph.is_connected(rest)
        first = rest if last else graph.first_series_part(rest)
        if first is None:
            # Not SP: canvas would need a barrier here. This part and all after it are released.
            return _as_chain(steps), set(rest)
        expr, released = _compile(graph, first)
        rest = rest - first
        if expr is not None:
            steps.append(expr)
        if released:
            return _as_chain(steps), released | set(rest)
    return _as_chain(steps), set()


def _as_chain(steps: list[Expr]) -> Expr | None:
    return None if not steps else steps[0] if len(steps) == 1 else ("chain", steps)


def node_signature(task: Task, priority: int | None = None) -> Signature:
    return message(RUN_TASK, **run_task_options(task, queue=task.queue, priority=priority))


def peak_widths(expr: Expr, tasks: Mapping[str, Task]) -> Counter:
    """The most messages of each capability the canvas of `expr` can have in flight at once:
    a group's parts run side by side, a chain's one after another."""
    if isinstance(expr, str):
        task = tasks[expr]
        return Counter() if task.pinned_agent else Counter({task.capability: 1})  # a pin: its agent's queue
    kind, parts = expr
    widths = [peak_widths(part, tasks) for part in parts]
    return reduce(operator.add if kind == "group" else operator.or_, widths)


def _to_signature(expr: Expr, nodes: dict[str, Signature], in_group: bool = False) -> Signature:
    """The canvas of an SP expression. run_task stores no Celery result (the database has the
    outcome), except inside a group: every group is a chord header here (something always
    follows, at least finalize_session), and Celery's docs require chord members to keep
    their results."""
    if isinstance(expr, str):
        return nodes[expr].set(ignore_result=False) if in_group else nodes[expr]
    kind, parts = expr
    built = [_to_signature(part, nodes, in_group or kind == "group") for part in parts]
    return in_series(built) if kind == "chain" else group(built)


def in_series(parts: list[Signature]) -> Signature:
    """`chain(*parts)`, the very canvas Celery builds, without its cost. Celery's chain() joins the
    parts with `|`, and each join copies every part before it: 75 ms for a 200-task chain. The
    plain tasks before the first group are joined here in one step; from the last of them on,
    Celery's own `|` goes on (its rules look only at the last two parts, never at plain tasks
    further back)."""
    first_group = next((i for i, part in enumerate(parts) if isinstance(part, group | chord | _chain)), len(parts))
    head, rest = parts[:first_group], parts[first_group:]
    if not rest:
        return head[0] if len(head) == 1 else chain(head, app=current_app)
    joined = reduce(operator.or_, rest, chain(head[-1:], app=current_app))
    return chain([*head[:-1], *joined.tasks], app=current_app) if head else joined


def build_canvas(session: Session) -> tuple[Signature | None, list[Task]]:
    """The canvas for the session's pending and queued tasks, and the tasks left to the database.

    Canvas nodes get fresh message ids (stored on the task so cancel can revoke them).
    """
    unfinished = (
        Task.objects.filter(session=session, status__in=Task.UNFINISHED)
        # What node_signature reads (Task.queue among it): a field left out costs a query per task.
        .only("key", "position", "status", "capability", "pinned_agent", "pinned_via_gateway", "timeout_seconds")
        .order_by("position")
    )
    tasks, running = {}, set()
    for task in unfinished:
        if task.status == Task.Status.RUNNING:
            running.add(task.pk)
        else:
            tasks[task.key] = task
    if not tasks:
        return None, []
    key_of = {t.pk: key for key, t in tasks.items()}
    deps: dict[str, list[str]] = {key: [] for key in tasks}
    waiting_outside = set()  # open tasks with an upstream that is still running
    edges = Task.depends_on.through.objects.filter(from_task__session=session).values_list("from_task_id", "to_task_id")
    for down, up in edges:
        if down not in key_of:
            continue
        if up in key_of:
            deps[key_of[down]].append(key_of[up])
        elif up in running:
            waiting_outside.add(key_of[down])
    for ups in deps.values():
        ups.sort(key=lambda key: tasks[key].position)
    plan = plan_dag(deps, waiting_outside)
    nodes: dict[str, Signature] = {}

    def mark(lane: str | None) -> None:
        """Under fair share's lock: the canvas's nodes get their message ids (and so count as in
        flight), the rest none. No lane: no room for the canvas, the database releases every task."""
        priority = backlog_priority(session.priority) if lane == fairshare.BACKLOG else None
        for key, task in tasks.items():
            task.via_canvas = lane is not None and key not in plan.released
            if task.via_canvas:
                node = nodes[key] = node_signature(task, priority)
                task.message_id, task.dispatched_to = node.id, node.options["queue"]
            else:
                task.message_id = task.dispatched_to = ""
        statements.mark_sending(list(tasks.values()))

    if fairshare.reserve_canvas(session, dict(peak_widths(plan.canvas, tasks)) if plan.canvas else {}, mark) is None:
        plan = Plan(None, set(tasks))
    released = [tasks[key] for key in tasks if key in plan.released]
    if plan.canvas is None:
        return None, released
    final = message(FINALIZE_SESSION, str(session.pk), queue="orchestrator", priority=session.broker_priority)
    steps = plan.canvas[1] if isinstance(plan.canvas, tuple) and plan.canvas[0] == "chain" else [plan.canvas]
    return in_series([*(_to_signature(step, nodes) for step in steps), final]), released
