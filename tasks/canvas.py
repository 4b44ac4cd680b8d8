"""Compile a session's unfinished task DAG into a Celery canvas.

The DAG is cut into topological levels; a level of one task is a plain signature, a level of
several is a group, and Celery turns "group followed by anything" in a chain into a chord, so

    a -> (b, c) -> d        becomes        chain(a, chord([b, c], chord-body d ... finalize))

Every node is run_task.si(task_id) on the task's capability queue with the session's broker
priority; the last link is finalize_session on the orchestrator queue. Messages are hints:
run_task re-checks the database, so a node that arrives early waits for its upstreams.
"""

from celery import chain, group
from celery.canvas import Signature

from sessions.models import Session

from .dag import topological_levels
from .models import Task


def node_signature(task: Task, priority: int) -> Signature:
    from .tasks import run_task

    return run_task.si(str(task.pk)).set(queue=task.queue, priority=priority)


def build_canvas(session: Session) -> Signature | None:
    """The canvas for every pending or queued task of the session, or None if there is none."""
    from .tasks import finalize_session

    tasks = {
        t.key: t
        for t in Task.objects.filter(session=session, status__in=(Task.Status.PENDING, Task.Status.QUEUED))
        .prefetch_related("depends_on")
        .order_by("position")
    }
    if not tasks:
        return None
    deps = {key: [up.key for up in task.depends_on.all()] for key, task in tasks.items()}
    steps = []
    for level in topological_levels(deps):
        nodes = [node_signature(tasks[key], session.broker_priority) for key in level]
        steps.append(nodes[0] if len(nodes) == 1 else group(nodes))
    steps.append(finalize_session.si(str(session.pk)).set(queue="orchestrator", priority=session.broker_priority))
    return chain(*steps)
