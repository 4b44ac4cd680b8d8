"""The Celery messages the engine sends, by the names tasks/tasks.py registers them under.

The engine enqueues by name because the task bodies in tasks/tasks.py call the engine:
importing them here would close a loop. Every process registers the tasks at startup
(tasks/apps.py), so a signature by name resolves to the registered task when it is sent and
the task's own options apply, as if it had been imported. The names are a contract
with messages already in the broker, Beat's schedule rows and Flower: they stay when code moves.
"""

import secrets
import uuid

from celery import current_app
from celery.canvas import Signature
from django.conf import settings

from sessions.models import broker_priority

from .models import Task

RUN_TASK = "tasks.run_task"
DISPATCH_SESSION = "tasks.dispatch_session"
FINALIZE_SESSION = "tasks.finalize_session"
MARK_SESSION_RUNNING = "tasks.mark_session_running"


def message(name: str, *args, **options) -> Signature:
    """An immutable signature of the task registered as `name`, with `args` and `options`."""
    return current_app.signature(name, args=args, immutable=True).set(**options)


def new_message_id(task: Task) -> str:
    """A fresh Celery id for a run_task message: the task's id, a dot and a random token.

    run_task reads its task from this id rather than from an argument: a chain's message
    carries every later step of the chain, so an argument per step would make a long chain's
    messages larger and every step slower (`make bench`, B1). The token makes every dispatch's
    id new, so that a cancel's revoke never discards a later dispatch of the same task."""
    return f"{task.pk}.{secrets.token_hex(4)}"


def task_of_message(message_id: str) -> uuid.UUID | None:
    """The task a run_task message id names (see new_message_id); None for any other id."""
    try:
        return uuid.UUID(message_id.partition(".")[0])
    except ValueError:
        return None


def run_task_options(task: Task, *, queue: str, message_id: str | None = None, priority: int | None = None) -> dict:
    """Options of a run_task message: queue, an id naming the task (stored on the task so a
    cancel can revoke it; `message_id` if given, a fresh one otherwise) and, for a task with its
    own deadline, its time limits.

    Every run_task message within a tenant's share has the same broker priority, whatever its
    session's: on a queue that tenants share, a priority would let one tenant's flood overtake
    another's work. Fair share (tasks.fairshare) decides what reaches the queues; the session
    priority orders a tenant's own releases. `priority`: a lone tenant's backlog canvas
    (backlog_priority)."""
    options = {
        "queue": queue,
        "priority": settings.CELERY_TASK_DEFAULT_PRIORITY if priority is None else priority,
        "task_id": message_id or new_message_id(task),
    }
    if task.timeout_seconds:
        options.update(soft_time_limit=task.timeout_seconds, time_limit=task.timeout_seconds + 60)
    return options


def backlog_priority(session_priority: int) -> int:
    """The broker priority of a backlog canvas's run_task messages (tasks.fairshare): below the
    one every message within a share carries (the API's priority 5), and ordered among backlogs
    by the session's priority, two API priorities to a step (0-1 lowest, 8-9 highest)."""
    return broker_priority(session_priority // 2)
