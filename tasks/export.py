"""A tenant's data as JSON Lines (docs/DATA.md, "Export"): the API's GET /api/v1/tenant/export/
and `manage.py export_tenant` both write what `export_lines` yields.

One JSON object per line, each with a "type": first the tenant, then its members, sessions,
tasks, session events, checkpoints and the results external agents reported (EAP deliveries).
Each table is read in chunks (`iterator`), so memory stays flat however large the tenant. Rows
are read table by table, not in one snapshot: a session created while the export runs may
appear without its tasks. What agents wrote is redacted again as it leaves (rows stored before
write-time redaction existed were not).
"""

import json
from collections.abc import Iterator

from django.contrib.postgres.aggregates import ArrayAgg
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import F, Q
from django.utils import timezone

from agents.models import EapDelivery
from orchestrator_project.redaction import redact, redact_data
from sessions.models import Checkpoint, Session, SessionEvent
from tenants.models import Membership, Tenant

from .models import Task

FORMAT_VERSION = 1
CHUNK = 500

SESSION_FIELDS = (
    "id", "title", "requirements", "status", "priority", "template", "fail_fast", "repository", "base_branch",
    "base_commit", "metadata", "result", "timeout_seconds", "deadline", "max_retries", "retry_count",
    "created_at", "updated_at", "started_at", "finished_at",
)  # fmt: skip
TASK_FIELDS = (
    "id", "session_id", "key", "title", "instructions", "capability", "required", "params", "status", "attempts",
    "max_attempts", "result", "error", "position", "estimate_optimistic_h", "estimate_likely_h",
    "estimate_pessimistic_h", "pinned_agent", "timeout_seconds", "created_at", "queued_at", "started_at",
    "finished_at",
)  # fmt: skip
EVENT_FIELDS = ("id", "session_id", "from_status", "to_status", "reason", "actor", "version", "created_at")
DELIVERY_FIELDS = ("id", "task_id", "attempt", "state", "result", "error", "created_at", "claimed_at", "finished_at")
# What an agent or a person wrote, redacted again on the way out.
REDACTED_TEXT = ("error", "reason")
REDACTED_DATA = ("result", "metadata", "params")


def export_lines(tenant: Tenant) -> Iterator[str]:
    """The tenant's data, one JSON line (ending in a newline) at a time."""
    yield _line("tenant", {"slug": tenant.slug, "name": tenant.name, "created_at": tenant.created_at,
                           "exported_at": timezone.now(), "format": FORMAT_VERSION})  # fmt: skip
    members = Membership.objects.filter(tenant=tenant).order_by("pk")
    for row in members.values("role", "created_at", username=F("user__username")).iterator(CHUNK):
        yield _line("member", row)
    sessions = Session.objects.filter(tenant=tenant).order_by("created_at", "pk")
    for row in sessions.values(*SESSION_FIELDS, created_by_username=F("created_by__username")).iterator(CHUNK):
        row["created_by"] = row.pop("created_by_username")  # None once the user is erased
        yield _line("session", row)
    tasks = (
        Task.objects.filter(session__tenant=tenant)
        .order_by("session_id", "position", "pk")
        .annotate(
            depends_on_keys=ArrayAgg("depends_on__key", filter=Q(depends_on__isnull=False), default=[]),
        )
    )
    for row in tasks.values(*TASK_FIELDS, "depends_on_keys", agent_name=F("agent__name")).iterator(CHUNK):
        row["depends_on"] = sorted(row.pop("depends_on_keys"))
        row["agent"] = row.pop("agent_name")
        yield _line("task", row)
    events = SessionEvent.objects.filter(session__tenant=tenant).order_by("pk")
    for row in events.values(*EVENT_FIELDS).iterator(CHUNK):
        yield _line("event", row)
    checkpoints = Checkpoint.objects.filter(session__tenant=tenant).order_by("pk")
    for row in checkpoints.values("id", "session_id", "task_id", "created_at", task_key=F("task__key")).iterator(CHUNK):
        yield _line("checkpoint", row)
    deliveries = EapDelivery.objects.filter(task__session__tenant=tenant).order_by("pk")
    for row in deliveries.values(*DELIVERY_FIELDS, agent_name=F("agent__name")).iterator(CHUNK):
        row["agent"] = row.pop("agent_name")
        yield _line("eap_delivery", row)


def _line(kind: str, row: dict) -> str:
    for name in REDACTED_TEXT:
        if isinstance(row.get(name), str):
            row[name] = redact(row[name])
    for name in REDACTED_DATA:
        if name in row:
            row[name] = redact_data(row[name])
    return json.dumps({"type": kind, **row}, cls=DjangoJSONEncoder, ensure_ascii=False) + "\n"
