# ruff: noqa: S608 - statements built from constants and introspected column names; values are parameters
"""B4's stored history: finished sessions written in SQL, seconds for 100,000 of them.

One real session is made and finished through the ORM (the template: 6 tasks, root -> 4 -> sink,
its events and checkpoints), then every history session is a copy of it made by INSERT ...
SELECT over generate_series, with ids derived from the tenant and the copy's number (md5 as a UUID), so that a
copy's tasks, edges and checkpoints find each other without a round trip. Columns are copied
from the template unless named here, so a new model field needs no change.

History sessions are created 0.5 s apart going back from now (100,000 span 14 hours: inside the
agents' statistics window, the worst case), one in ten failed, and their tasks alternate
between the agents given, so each agent carries half of the history.
"""

import sys
import time
from datetime import timedelta
from urllib.parse import urlparse

from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from agents.models import Agent
from bench import BenchError, shapes
from bench.env import DATABASE_URL as BENCH_DATABASE_URL
from bench.ours import new_session
from sessions.models import SETTLED, Checkpoint, Session, SessionEvent
from tasks.models import Task
from tenants.models import Tenant

TEMPLATE_TITLE = "history template"
SPACING_S = 0.5
TASKS_PER_SESSION = 6


def task_id(position: str) -> str:
    """A copy's task id: its session's id with the task's position in the last 4 digits, so that
    rows inserted in session order are in id order too (sorted inserts into every index that
    starts with either, instead of random ones: most of the time, otherwise)."""
    return f"overlay(md5(%(seed)s || g) placing lpad(to_hex({position}), 4, '0') from 29)::uuid"


# The columns written from the copy's number g; every other column is the template's.
SESSION_COLUMNS = {
    "id": "md5(%(seed)s || g)::uuid",
    "title": "'history ' || g",
    "status": "CASE WHEN g %% 10 = 0 THEN 'failed' ELSE 'completed' END",
    "idempotency_key": "NULL",
    "created_at": "%(now)s - g * %(spacing)s",
    "updated_at": "%(now)s - g * %(spacing)s + interval '10 seconds'",
    "started_at": "%(now)s - g * %(spacing)s + interval '1 second'",
    "finished_at": "%(now)s - g * %(spacing)s + interval '10 seconds'",
}
TASK_COLUMNS = {
    "id": task_id("src.position"),
    "session_id": "md5(%(seed)s || g)::uuid",
    "agent_id": "(%(agents)s::bigint[])[1 + g %% cardinality(%(agents)s::bigint[])]",
    "created_at": "%(now)s - g * %(spacing)s",
    "queued_at": "%(now)s - g * %(spacing)s + interval '1 second'",
    "started_at": "%(now)s - g * %(spacing)s + interval '2 seconds'",
    "finished_at": "%(now)s - g * %(spacing)s + interval '3 seconds'",
}
EDGE_COLUMNS = {
    "from_task_id": task_id("src.from_position"),
    "to_task_id": task_id("src.to_position"),
}
EVENT_COLUMNS = {
    "session_id": "md5(%(seed)s || g)::uuid",
    "created_at": "%(now)s - g * %(spacing)s",
}
CHECKPOINT_COLUMNS = {
    "session_id": "md5(%(seed)s || g)::uuid",
    "task_id": task_id("src.task_position"),
    "created_at": "%(now)s - g * %(spacing)s",
}


# What each copy is made of, in the order the foreign keys need: the model, the columns written
# from g, and the template's rows (with the positions that name a copy's tasks).
COPIES = [
    (Session, SESSION_COLUMNS, "SELECT * FROM agent_sessions_session WHERE id = %(template)s"),
    (Task, TASK_COLUMNS, "SELECT * FROM tasks_task WHERE session_id = %(template)s"),
    (
        Task.depends_on.through,
        EDGE_COLUMNS,
        "SELECT e.*, f.position AS from_position, u.position AS to_position FROM tasks_task_depends_on e "
        "JOIN tasks_task f ON f.id = e.from_task_id JOIN tasks_task u ON u.id = e.to_task_id "
        "WHERE f.session_id = %(template)s",
    ),
    (SessionEvent, EVENT_COLUMNS, "SELECT * FROM agent_sessions_sessionevent WHERE session_id = %(template)s"),
    (
        Checkpoint,
        CHECKPOINT_COLUMNS,
        "SELECT c.*, t.position AS task_position FROM agent_sessions_checkpoint c "
        "JOIN tasks_task t ON t.id = c.task_id WHERE c.session_id = %(template)s",
    ),
]


def columns(table: str) -> list[str]:
    with connection.cursor() as cursor:
        return [c.name for c in connection.introspection.get_table_description(cursor, table)]


def copy_statement(model, written: dict[str, str], template_rows: str) -> str:
    """INSERT INTO model's table one row per (template row, copy number g). `template_rows`
    selects the template's rows, named `src`; a serial id is left to its default. The template's
    rows are materialised first: scanned once per copy, the table would be read again with every
    row inserted so far."""
    table = model._meta.db_table
    names = [c for c in columns(table) if c in written or not (c == "id" and model._meta.pk.name == "id")]
    picked = ", ".join(written.get(c, f"src.{c}") for c in names)
    return (
        f"WITH src AS MATERIALIZED ({template_rows}) INSERT INTO {table} ({', '.join(names)}) "
        f"SELECT {picked} FROM src, generate_series(%(first)s, %(last)s) g ORDER BY md5(%(seed)s || g)"
    )


def template(tenant: Tenant, agents: list[Agent]) -> Session:
    """The session every history session copies, finished as a real one would be."""
    existing = Session.objects.filter(tenant=tenant, title=TEMPLATE_TITLE).first()
    if existing is not None:
        return existing
    specs = shapes.fan(TASKS_PER_SESSION - 2)
    session = new_session(tenant, TEMPLATE_TITLE, specs)
    now = timezone.now()
    tasks = list(session.tasks.order_by("position"))
    for number, task in enumerate(tasks):
        task.status = Task.Status.COMPLETED
        task.agent = agents[number % len(agents)]
        task.attempts = 1
        task.upstream_open = 0
        task.started_at, task.finished_at = now, now + timedelta(seconds=1)
        task.result = {"output": f"{task.key} done", "executor": "scripted"}
    Task.objects.bulk_update(
        tasks, ["status", "agent", "attempts", "upstream_open", "started_at", "finished_at", "result"]
    )
    Checkpoint.objects.bulk_create(Checkpoint(session=session, task=task) for task in tasks)
    steps = [("pending", "queued", "started"), ("queued", "running", "task root claimed"), ("running", "completed", "")]
    SessionEvent.objects.bulk_create(
        SessionEvent(session=session, from_status=a, to_status=b, reason=why, actor="bench", fencing_token=1, version=n)
        for n, (a, b, why) in enumerate(steps, start=1)
    )
    Session.objects.filter(pk=session.pk).update(status="completed", version=len(steps), finished_at=now)
    return session


def stored(tenant: Tenant) -> int:
    """How many history sessions the tenant has (the template is one)."""
    return Session.objects.filter(tenant=tenant).count()


def grow(tenant: Tenant, agents: list[Agent], sessions: int) -> float:
    """Store history until the tenant has `sessions`; returns the seconds it took."""
    started = time.perf_counter()
    source = template(tenant, agents)
    first, last = stored(tenant), sessions - 1  # the template is copy 0
    if last < first:
        return 0.0
    params = {
        "template": source.pk,
        "seed": f"{tenant.pk}:",  # copies of another tenant's history get other ids
        "first": first,
        "last": last,
        "now": timezone.now(),
        "spacing": timedelta(seconds=SPACING_S),
        "agents": [agent.pk for agent in agents],
    }
    with transaction.atomic(), connection.cursor() as cursor:
        skip_foreign_key_checks(cursor)
        for model, written, template_rows in COPIES:
            cursor.execute(copy_statement(model, written, template_rows), params)
            # Fresh statistics before the next table's foreign keys are checked against this one:
            # planned for the table as it was, each check would scan it whole.
            cursor.execute(f"ANALYZE {model._meta.db_table}")
    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE)")
    write_out_wal()
    return time.perf_counter() - started


def write_out_wal() -> None:
    """Write the burst of changed pages to disk now: history that took days to grow in production
    took seconds here, and PostgreSQL's checkpoint would otherwise spend the next minute
    writing it while the hot path is measured (4.4 -> 6.7 ms per task, with no statement slower)."""
    try:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("CHECKPOINT")
    except DatabaseError:
        print("B4: not allowed to CHECKPOINT; the hot path may be measured while history is written", file=sys.stderr)


def table_bytes() -> int:
    """The bytes on disk of the tables history fills, with their indexes and TOAST."""
    tables = [model._meta.db_table for model, _, _ in COPIES]
    with connection.cursor() as cursor:
        cursor.execute("SELECT sum(pg_total_relation_size(t::regclass)) FROM unnest(%s::text[]) t", [tables])
        return int(cursor.fetchone()[0])


def skip_foreign_key_checks(cursor) -> None:
    """For this transaction, where the role may (a superuser, as on a development machine): the
    rows are consistent by construction, and checking a million foreign keys one row at a time
    is most of the time otherwise."""
    try:
        with transaction.atomic():
            cursor.execute("SET LOCAL session_replication_role = replica")
    except DatabaseError:
        print("B4: not a superuser, so history is stored with its foreign keys checked (slower)", file=sys.stderr)


def forget_measured(tenant: Tenant, settle_timeout_s: float = 30.0) -> None:
    """Delete the sessions the measuring made (not the history) and everything of theirs, in
    SQL: the ORM's cascade would load every row to delete it. Once the orchestrator has settled
    them (it writes their last events), and with the sessions locked, so that nothing adds a row
    of theirs half-way."""
    measured = Session.objects.filter(tenant=tenant).exclude(title__startswith="history ")
    deadline = time.monotonic() + settle_timeout_s
    while measured.exclude(status__in=SETTLED).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    sessions = "SELECT id FROM agent_sessions_session WHERE tenant_id = %(tenant)s AND title NOT LIKE 'history %%'"
    tasks = f"SELECT id FROM tasks_task WHERE session_id IN ({sessions})"
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"{sessions} FOR UPDATE", {"tenant": tenant.pk})
        deletes = [
            *deletes_referring(Task, tasks),
            *deletes_referring(Session, sessions, but=Task),
            f"DELETE FROM tasks_task WHERE session_id IN ({sessions})",
            f"DELETE FROM agent_sessions_session WHERE id IN ({sessions})",
        ]
        for sql in deletes:
            cursor.execute(sql, {"tenant": tenant.pk})
    with connection.cursor() as cursor:
        cursor.execute("VACUUM (ANALYZE)")


def deletes_referring(model, ids: str, but=None) -> list[str]:
    """A DELETE, of the rows that point at the rows `ids` selects, for every table with a foreign
    key to `model` (a many-to-many's through table too; not `but`'s): a table added later as well."""
    return [
        f"DELETE FROM {f.related_model._meta.db_table} WHERE {f.field.column} IN ({ids})"
        for f in model._meta.get_fields(include_hidden=True)
        if f.one_to_many and f.related_model is not but
    ]


def forget_all() -> None:
    """Empty every table a session fills, in the benchmark's own database: deleting a million
    sessions row by row takes minutes, truncating takes none. The other benchmarks' sessions go
    too; each of them starts by deleting its earlier runs anyway."""
    if connection.settings_dict["NAME"] != urlparse(BENCH_DATABASE_URL).path.lstrip("/"):
        raise BenchError(f"B4 truncates only the benchmark's database, not {connection.settings_dict['NAME']}")
    tables = [model._meta.db_table for model, _, _ in COPIES]
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {', '.join(tables)} CASCADE")
