"""What the broker and the live workers still hold, asked as every broker answers it, so that the
sweeper can tell a lost run_task message from one that waits (tasks/sweeps.py,
redispatch_lost_messages).

A message waits on its queue until a worker takes it; a worker holds it, unacknowledged, while
it runs the task, while it has it prefetched, and while a retry's countdown holds it. So a queued
task's message is lost when its queue has no message waiting and no live worker holds its id.
A queue with messages waiting might hold it: such a task is looked at again once its queue
drains (which it does, or its tasks would not be waiting on it).
"""

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from celery import current_app
from kombu import Connection
from kombu.exceptions import OperationalError

from agents.models import Agent

logger = logging.getLogger(__name__)

# How long the live agent workers get to say what they hold. One that answers later is taken for
# gone: its message is sent again, which is harmless (the claim is a compare-and-set).
INSPECT_TIMEOUT_S = 2.0

T = TypeVar("T")


def queues_with_messages(conn: Connection, queues: Iterable[str]) -> set[str]:
    """The queues among `queues` that have messages waiting (a passive declare: the broker's
    count of ready messages, every priority of the queue included). A queue the broker does not
    know has none."""
    busy = set()
    for name in queues:
        # A channel per question: RabbitMQ closes the channel that asks about a missing queue.
        with conn.channel() as channel:
            try:
                _, waiting, _ = channel.queue_declare(queue=name, passive=True)
            except conn.channel_errors:  # the broker does not know the queue
                waiting = 0
        if waiting:
            busy.add(name)
    return busy


def message_ids_held_by_workers(conn: Connection, message_ids: Iterable[str]) -> set[str]:
    """Those of `message_ids` that a live agent worker holds: running, prefetched, or waiting for
    a countdown (Celery's remote control, query_task). Only agent workers take run_task
    messages; one that does not answer within INSPECT_TIMEOUT_S holds nothing."""
    message_ids = set(message_ids)
    workers = list(
        Agent.objects.filter(mode=Agent.Mode.WORKER)
        .exclude(status=Agent.Status.OFFLINE)
        .exclude(worker_name="")
        .values_list("worker_name", flat=True)
    )
    if not workers:
        return set()
    inspect = current_app.control.inspect(
        destination=workers, timeout=INSPECT_TIMEOUT_S, limit=len(workers), connection=conn
    )
    # query_task knows the messages a worker runs or has prefetched; those a countdown holds
    # are only in its schedule.
    held = {message_id for found in (inspect.query_task(*message_ids) or {}).values() for message_id in found}
    held.update(entry["request"]["id"] for entries in (inspect.scheduled() or {}).values() for entry in entries)
    return held & message_ids


def _ask(question: Callable[[Connection], T]) -> T | None:
    """`question(conn)` on a broker connection of its own (one pooled across a broker restart is
    dead); None when the broker cannot be asked."""
    conn = current_app.connection_for_write()
    try:
        with conn:
            return question(conn)
    except (OperationalError, *conn.connection_errors):
        logger.warning("the broker cannot be asked what it holds; lost messages are looked for later", exc_info=True)
        return None


def busy_queues(queues: Iterable[str]) -> set[str] | None:
    """Those of `queues` with messages waiting (queues_with_messages); None when the broker cannot
    be asked."""
    return _ask(lambda conn: queues_with_messages(conn, set(queues)))


def lost_message_ids(messages: dict[str, str]) -> set[str] | None:
    """Of `messages` (message id -> the queue it was sent to), those the broker and the live
    workers no longer hold; None when the broker cannot be asked."""

    def lost(conn: Connection) -> set[str]:
        busy = queues_with_messages(conn, set(messages.values()))
        held = message_ids_held_by_workers(conn, messages)
        return {message_id for message_id, queue in messages.items() if queue not in busy and message_id not in held}

    return _ask(lost)
