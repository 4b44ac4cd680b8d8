"""The SQL of a task's hot path: the few statements every run_task issues.

A zero-work task costs two round trips: take (load and claim) and record (which also queues a
dependent whose only upstream it was). A third, release, runs when a fan-in's last upstream
finishes or an outcome blocks what follows.

They are written in SQL rather than with the ORM because each does in one statement what would
take three or four (PostgreSQL's data-modifying WITH runs them atomically, in one round
trip), and because compiling an ORM query costs more than running one of these. `make bench`
(B1) measures the result against raw Celery.

Rules every statement here keeps:
- An UPDATE that hands a task over filters on the task row's own columns (status, attempts):
  PostgreSQL re-checks those after waiting on the row lock, so two racing statements cannot
  both win. (A filter through a subquery, which Django writes for a filter across a relation,
  is not re-checked: two racing claims would both win.)
- Task.upstream_open changes in the same statement as the upstream's finish, so it is lowered
  exactly once per finish, however often a message is delivered.
"""

import logging

import psycopg
from django.conf import settings
from django.db import OperationalError, connection
from django.db.backends.utils import CursorWrapper
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

logger = logging.getLogger(__name__)

# The task's columns execute_task uses (LOAD_FIELDS, in this order), what it needs of its
# session, the agents that ran its upstreams, the attempt this agent claimed it for and, last,
# the database's time of the claim (its started_at).
# The session statuses in it are sessions.models.ACTIVE (a test holds them equal).
# The claim happens at once when nothing needs a closer look: the session is active, the task
# queued, and routing keeps it here - routing is settled (%(routing_settled)s: the message came
# on this agent's own queue), the task is pinned, or no upstream has run elsewhere. Otherwise
# the attempt is NULL and execute_task looks at the row to see why.
TAKE = """
WITH t AS (
    SELECT t.id, t.session_id, t.key, t.title, t.capability, t.instructions, t.params, t.required, t.status,
           t.attempts, t.max_attempts, t.pinned_agent, t.timeout_seconds, t.via_canvas, t.queued_at,
           s.status AS session_status, s.fail_fast, s.priority, s.version, s.tenant_id,
           ARRAY(SELECT DISTINCT u.agent_id FROM tasks_task_depends_on e JOIN tasks_task u ON u.id = e.to_task_id
                 WHERE e.from_task_id = t.id AND u.agent_id IS NOT NULL) AS upstream_agents
    FROM tasks_task t JOIN agent_sessions_session s ON s.id = t.session_id
    WHERE t.id = %(task)s
), claimed AS (
    UPDATE tasks_task c
    SET status = 'running', attempts = c.attempts + 1, agent_id = %(agent)s, started_at = now(),
        lease_expires_at = now() + make_interval(secs => %(lease)s), worker_pid = %(pid)s,
        error = ''
    FROM t
    WHERE c.id = t.id AND c.status = 'queued' AND t.session_status IN ('queued', 'running', 'degraded')
      AND (%(routing_settled)s OR t.pinned_agent <> '' OR t.upstream_agents = '{}'
           OR %(agent)s = ANY(t.upstream_agents))
    RETURNING c.attempts
)
SELECT t.*, (SELECT attempts FROM claimed), now() FROM t
"""
LOAD_FIELDS = (
    "id", "session_id", "key", "title", "capability", "instructions", "params", "required", "status",
    "attempts", "max_attempts", "pinned_agent", "timeout_seconds", "via_canvas", "queued_at",
)  # fmt: skip

# running -> outcome for this attempt, with everything that goes with it: a checkpoint for a
# completed task, and one upstream fewer for each pending dependent. A dependent whose
# only upstream this is, and which it lets run, is queued right here; one that waits for other
# upstreams too is released by RELEASE after this commits (it must see their committed status).
# Returns whether the outcome was recorded, the dependents, those with no upstream left open
# that are still pending, and those queued here that are not canvas nodes (they need a message).
RECORD = """
WITH done AS (
    UPDATE tasks_task
    SET status = %(status)s, result = %(result)s::jsonb, error = %(error)s, finished_at = now(),
        lease_expires_at = NULL, worker_pid = NULL
    WHERE id = %(task)s AND status = 'running' AND attempts = %(attempt)s
    RETURNING id, session_id, key, status, (status = 'completed' OR (status = 'failed' AND NOT required)) AS lets_run
), checkpoint AS (
    INSERT INTO agent_sessions_checkpoint (session_id, task_id, created_at)
    SELECT done.session_id, done.id, now() FROM done WHERE done.status = 'completed'
), dependent AS (
    SELECT e.from_task_id AS id, done.lets_run AND NOT EXISTS (
        SELECT FROM tasks_task_depends_on other
        WHERE other.from_task_id = e.from_task_id AND other.to_task_id <> done.id
    ) AS runs_now
    FROM tasks_task_depends_on e JOIN done ON e.to_task_id = done.id
), opened AS (
    UPDATE tasks_task d
    SET upstream_open = d.upstream_open - 1,
        status = CASE WHEN dependent.runs_now THEN 'queued' ELSE 'pending' END,
        queued_at = CASE WHEN dependent.runs_now THEN now() END
    FROM dependent
    WHERE d.id = dependent.id AND d.status = 'pending'
    RETURNING d.id, d.upstream_open, d.status, d.via_canvas
)
SELECT (SELECT count(*) FROM done),
       ARRAY(SELECT id FROM opened),
       ARRAY(SELECT id FROM opened WHERE upstream_open = 0 AND status = 'pending'),
       ARRAY(SELECT id FROM opened WHERE status = 'queued' AND NOT via_canvas)
"""

# Of the given tasks, pending -> skipped for those with a blocking upstream, pending -> queued
# for those with no upstream left open. An upstream blocks its dependents if it was cancelled or
# skipped (a skip passes on down the DAG, through optional tasks too), or is required and
# failed; the first such upstream is named in the skip's reason. A skip is a finish: its
# pending dependents get one upstream fewer in the same statement (they are blocked now, so
# they are skipped next). The culprit is looked for in the statement's snapshot, so a task is
# queued only if no upstream was left open in that snapshot too (open_then): an upstream
# that finished since - perhaps failing - is seen by its own release, which follows its record.
# Returns ("moved", id, status, via_canvas, capability) and ("opened", id, NULL, NULL, NULL) rows.
RELEASE = """
WITH candidate AS (
    SELECT t.id, t.upstream_open AS open_then, (
        SELECT u.key || ' ' || u.status FROM tasks_task_depends_on e JOIN tasks_task u ON u.id = e.to_task_id
        WHERE e.from_task_id = t.id AND (u.status IN ('cancelled', 'skipped') OR (u.required AND u.status = 'failed'))
        ORDER BY u.position LIMIT 1
    ) AS culprit
    FROM tasks_task t WHERE t.id = ANY(%(ids)s)
), moved AS (
    UPDATE tasks_task d
    SET status = CASE WHEN c.culprit IS NULL THEN 'queued' ELSE 'skipped' END,
        queued_at = CASE WHEN c.culprit IS NULL THEN now() END,
        finished_at = CASE WHEN c.culprit IS NULL THEN NULL ELSE now() END,
        error = COALESCE('skipped: upstream ' || c.culprit, '')
    FROM candidate c
    WHERE d.id = c.id AND d.status = 'pending' AND ((c.open_then = 0 AND d.upstream_open = 0) OR c.culprit IS NOT NULL)
    RETURNING d.id, d.status, d.via_canvas, d.capability
), opened AS (
    -- Not a task skipped by this statement itself: a row may be updated once per statement.
    UPDATE tasks_task x SET upstream_open = x.upstream_open - 1
    FROM tasks_task_depends_on e, moved
    WHERE moved.status = 'skipped' AND e.to_task_id = moved.id AND x.id = e.from_task_id
      AND x.status = 'pending' AND x.id NOT IN (SELECT id FROM moved)
    RETURNING x.id
)
SELECT 'moved', id, status, via_canvas, capability FROM moved
UNION ALL SELECT 'opened', id, NULL, NULL, NULL FROM opened
"""

# How each unfinished task of a session is sent: by the canvas (with its message id and queue)
# or released from the database. One statement for the whole DAG (bulk_update's CASE per row
# and field costs more than the canvas it describes).
MARK_SENDING = """
UPDATE tasks_task t SET via_canvas = v.via_canvas, message_id = v.message_id, dispatched_to = v.queue
FROM unnest(%(ids)s::uuid[], %(via_canvas)s::boolean[], %(message_ids)s::text[], %(queues)s::text[])
     AS v(id, via_canvas, message_id, queue)
WHERE t.id = v.id
"""

# Every pending task of a session counts its open upstreams again. Only while none of the
# session's tasks can finish concurrently (start, retry), or a finish could be counted twice.
# A running task's lease lives on while the process that claimed it does: its agent still
# beats and listed that process at its last beat. %(agent)s: one agent's tasks, or NULL for all.
RENEW_LEASES = """
UPDATE tasks_task t SET lease_expires_at = now() + make_interval(secs => %(lease)s)
FROM agents_agent a
WHERE t.agent_id = a.id AND t.status = 'running' AND t.worker_pid = ANY(a.processes)
  AND a.status <> 'offline' AND a.last_heartbeat > now() - make_interval(secs => %(offline_after)s)
  AND (%(agent)s::bigint IS NULL OR a.id = %(agent)s::bigint)
RETURNING t.id
"""

# Only rows whose count changed are written (at start, none is).
RECOUNT = """
UPDATE tasks_task t SET upstream_open = c.open
FROM (
    SELECT p.id, (
        SELECT count(*) FROM tasks_task_depends_on e JOIN tasks_task u ON u.id = e.to_task_id
        WHERE e.from_task_id = p.id AND u.status NOT IN ('completed', 'failed', 'skipped', 'cancelled')
    ) AS open
    FROM tasks_task p WHERE p.session_id = %s AND p.status = 'pending'
) c
WHERE t.id = c.id AND t.upstream_open <> c.open
"""


class _PreparedCursor(psycopg.Cursor):
    """Prepares every statement on its connection: planning these statements costs more than
    running them, and a prepared statement is planned once per connection."""

    def execute(self, query, params=None, *, prepare=None, binary=None):
        return super().execute(query, params, prepare=True if prepare is None else prepare, binary=binary)


def run(sql: str, params) -> list[tuple]:
    """Execute one statement on Django's connection (its transaction, health check, error
    translation and execute wrappers apply); returns its rows.

    Outside a transaction, a deadlock, a serialization failure or a lost connection is retried:
    every statement here is a compare-and-set, so running it again after it did commit (its
    reply lost) changes nothing and reports nothing moved; callers check the row then. Other
    hot-path statements run through here for the preparing too (fairshare.HAS_HELD): reads only,
    which are safe to run again.
    """
    try:
        return _execute(sql, params)
    except OperationalError as exc:
        if connection.in_atomic_block:
            raise  # the transaction is lost; its owner decides
        logger.warning("hot-path statement failed (%s); retrying", exc)
        connection.close_if_unusable_or_obsolete()
        return _execute_again(sql, params)


def mark_sending(tasks) -> None:
    """MARK_SENDING for these tasks, with the via_canvas, message_id and dispatched_to each carries."""
    run(
        MARK_SENDING,
        {
            "ids": [t.pk for t in tasks],
            "via_canvas": [t.via_canvas for t in tasks],
            "message_ids": [t.message_id for t in tasks],
            "queues": [t.dispatched_to for t in tasks],
        },
    )


def _execute(sql: str, params) -> list[tuple]:
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    raw = connection.connection
    cursor = _PreparedCursor(raw) if settings.DB_PREPARED_STATEMENTS else raw.cursor()
    with CursorWrapper(cursor, connection) as wrapped:
        wrapped.execute(sql, params)
        return wrapped.fetchall() if wrapped.description else []


def _reconnect(retry_state) -> None:
    logger.warning("hot-path statement failed again (%s); retrying", retry_state.outcome.exception())
    connection.close_if_unusable_or_obsolete()


# Only after a first failure: tenacity's bookkeeping costs more than a statement's Python side.
_execute_again = retry(
    retry=retry_if_exception_type(OperationalError),
    stop=stop_after_attempt(4),
    wait=wait_exponential(multiplier=0.05, max=2.0),
    before_sleep=_reconnect,
    reraise=True,
)(_execute)
