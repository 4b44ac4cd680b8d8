"""The session page's DAG as a drawing: a layered layout computed here and rendered as inline SVG
by the template (console/templates/console/session.html).

Columns are topological depths (a task sits one column right of its deepest upstream), and a
column keeps the tasks in their position order, centred against the tallest column. The layout
is deterministic and needs no JavaScript: the browser only changes status classes afterwards.
Edges skipping columns may cross nodes; past a few hundred tasks a real layout engine (ELK)
would do better (docs/reference glassbox.md, section 5).
"""

from dataclasses import dataclass, field
from itertools import pairwise

from tasks.dag import topological_levels

NODE_WIDTH = 144
NODE_HEIGHT = 48
COLUMN_GAP = 40
ROW_GAP = 16
MARGIN = 16
# Longer keys are cut in the drawing; the panel and the accessible name carry them whole.
KEY_CHARS = 17


@dataclass
class Node:
    id: str
    key: str
    status: str
    critical: bool
    x: int = 0
    y: int = 0

    @property
    def label(self) -> str:
        return self.key if len(self.key) <= KEY_CHARS else self.key[: KEY_CHARS - 1] + "\u2026"


@dataclass
class Edge:
    source: Node
    target: Node
    critical: bool

    @property
    def path(self) -> str:
        """A cubic curve from the right middle of the upstream to the left middle of the downstream."""
        x1, y1 = self.source.x + NODE_WIDTH, self.source.y + NODE_HEIGHT // 2
        x2, y2 = self.target.x - 2, self.target.y + NODE_HEIGHT // 2  # room for the arrowhead
        bend = max(24, (x2 - x1) // 2)
        return f"M{x1},{y1} C{x1 + bend},{y1} {x2 - bend},{y2} {x2},{y2}"


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    width: int = 0
    height: int = 0


def layout(tasks, upstreams: dict[str, list[str]], critical_keys: list[str]) -> Graph:
    """`tasks` in position order (each with id, key, status); `upstreams` maps a task's id to its
    upstream tasks' ids; `critical_keys` is the critical path, upstream first."""
    critical = set(critical_keys)
    nodes = {str(t.id): Node(str(t.id), t.key, t.status, t.key in critical) for t in tasks}
    levels = topological_levels({task_id: upstreams.get(task_id, []) for task_id in nodes})
    tallest = max((len(level) for level in levels), default=0)
    row = NODE_HEIGHT + ROW_GAP
    for depth, level in enumerate(levels):
        offset = (tallest - len(level)) * row // 2
        for index, task_id in enumerate(level):
            node = nodes[task_id]
            node.x = MARGIN + depth * (NODE_WIDTH + COLUMN_GAP)
            node.y = MARGIN + offset + index * row
    path_pairs = set(pairwise(critical_keys))
    edges = [
        Edge(nodes[up], nodes[down], (nodes[up].key, nodes[down].key) in path_pairs)
        for down, ups in upstreams.items()
        for up in ups
        if up in nodes and down in nodes
    ]
    width = 2 * MARGIN + len(levels) * NODE_WIDTH + max(len(levels) - 1, 0) * COLUMN_GAP
    height = 2 * MARGIN + tallest * row - (ROW_GAP if tallest else 0)
    # Critical edges last, so that they are drawn over the others.
    edges.sort(key=lambda edge: edge.critical)
    return Graph(list(nodes.values()), edges, width, height)
