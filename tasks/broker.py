"""What the broker still holds, so that the sweeper can tell a lost run_task message from one
that waits (tasks/sweeps.py, redispatch_lost_messages).

A message is held by the Redis transport in one of two places: a queue's list (one list per
priority step) while it waits, or the `unacked` hash once a worker has taken it (acks_late:
until the task returns, or while a countdown holds it). Other transports are not inspected.
"""

import json
import logging
from collections.abc import Iterable

from celery import current_app

logger = logging.getLogger(__name__)


def _message_id(raw: bytes) -> str | None:
    try:
        return json.loads(raw)["headers"]["id"]
    except (ValueError, KeyError, TypeError):
        return None


def held_message_ids(queues: Iterable[str], taken_since: float) -> set[str] | None:
    """The ids of the messages waiting on `queues`, or taken by a worker at or after
    `taken_since` (a Unix time) and not yet acknowledged; None when the broker cannot be
    inspected (not Redis).

    A message a worker took long ago for a task that is still queued (not claimed) belonged to a
    worker that died: Redis gives it back only after the visibility timeout (hours), so it does
    not count. A live worker claims what it takes at once, or within a retry's countdown."""
    with current_app.connection_for_read() as conn:
        if conn.transport.driver_type != "redis":
            logger.info("the broker is %s; lost messages are not looked for", conn.transport.driver_type)
            return None
        channel = conn.default_channel
        client = channel.client
        keys = {channel._q_for_pri(queue, step) for queue in queues for step in channel.priority_steps}
        held = set()
        for key in keys:
            held.update(_message_id(raw) for raw in client.lrange(key, 0, -1))
        recent = client.zrangebyscore(channel.unacked_index_key, taken_since, "+inf")
        for raw in client.hmget(channel.unacked_key, recent) if recent else ():
            try:
                payload = json.loads(raw)[0]
            except (ValueError, IndexError, TypeError):  # None: acknowledged meanwhile
                continue
            held.add(payload.get("headers", {}).get("id") if isinstance(payload, dict) else None)
        held.discard(None)
        return held
