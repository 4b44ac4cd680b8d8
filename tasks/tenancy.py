"""Deleting a tenant and erasing a person (docs/DATA.md): what `manage.py delete_tenant` and
`manage.py erase_user` run."""

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass, field

from axes.models import AccessAttempt, AccessFailureLog
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.db import transaction
from django.db.models import Q, TextField
from django.db.models.functions import Cast

from agents.models import AgentEvent, EapDelivery
from sessions.models import ACTIVE, FeedEvent, Session, SessionEvent
from sessions.workspaces import discard_session_files
from tenants.models import Membership, Tenant

from .models import Task

logger = logging.getLogger(__name__)


class TenantBusy(Exception):
    """The tenant still has work in flight; the message says what and what to do."""


@dataclass
class TenantDeleted:
    sessions: int
    # What stayed outside the database (a workspace or branch git or the lock refused), and why.
    stays: list[str] = field(default_factory=list)


def delete_tenant(tenant: Tenant) -> TenantDeleted:
    """Delete the tenant with everything it owns: its sessions with their tasks, events,
    checkpoints, feed rows and EAP deliveries, its memberships and external agents; then, once
    that has committed, each session's workspace directory and `io/session-*` branch.

    Refused (TenantBusy, nothing deleted) while a session is queued, running or degraded, or a
    task is still running (a paused session's, say): work in flight is cancelled through the
    session's lifecycle, not pulled from under its worker. The files go in an on-commit
    callback, so only once the rows are gone for good; outside a transaction that is before
    this returns, and `stays` then lists what could not be removed."""
    with transaction.atomic():
        # The sessions' row locks hold back transitions until we are done; the tenant's row lock
        # then holds back new sessions (create_session locks it). Sessions first, as a retry
        # locks its session, then the tenant (its quotas): the same order, no deadlock. Then the
        # sessions again, with any created before the tenant's lock was ours.
        locked = Session.objects.select_for_update().filter(tenant=tenant)
        list(locked.values_list("pk"))
        Tenant.objects.select_for_update().get(pk=tenant.pk)
        sessions = list(locked.values_list("pk", "repository", "status"))
        _refuse_if_busy(tenant, sessions)
        ids = [pk for pk, _, _ in sessions]
        for start in range(0, len(ids), settings.SWEEP_BATCH):
            # Session.tenant is PROTECT: the admin's delete button cannot take a tenant's
            # sessions (and leave their files behind); this is the way they go.
            Session.objects.filter(pk__in=ids[start : start + settings.SWEEP_BATCH]).delete()
        Tenant.objects.filter(pk=tenant.pk).delete()
        done = TenantDeleted(sessions=len(ids))

        def discard_files() -> None:
            for pk, repository, _ in sessions:
                done.stays.extend(discard_session_files(Session(pk=pk, repository=repository)))

        transaction.on_commit(discard_files)
    logger.info("tenant %s deleted with %d sessions", tenant.slug, len(ids))
    return done


def _refuse_if_busy(tenant: Tenant, sessions: list[tuple]) -> None:
    active = [str(pk) for pk, _, status in sessions if status in ACTIVE]
    running = Task.objects.filter(session__tenant=tenant, status=Task.Status.RUNNING).count()
    if not active and not running:
        return
    what = []
    if active:
        shown = ", ".join(active[:5]) + (", ..." if len(active) > 5 else "")
        what.append(f"{len(active)} active session(s) ({shown})")
    if running:
        what.append(f"{running} running task(s)")
    raise TenantBusy(
        f"tenant {tenant.slug} has {' and '.join(what)}: cancel or stop them first "
        "(POST /api/v1/sessions/<id>/cancel/), wait for running tasks to end, then delete again"
    )


def pseudonym(user) -> str:
    """The stable stand-in for an erased user: the same for all of one user's rows, and not
    computable from the name without SECRET_KEY and the user's (deleted) id."""
    digest = hmac.new(settings.SECRET_KEY.encode(), f"user:{user.pk}".encode(), hashlib.sha256).hexdigest()
    return f"erased-{digest[:16]}"


@dataclass
class UserErased:
    pseudonym: str
    rows: dict[str, int]


def erase_user(user) -> UserErased:
    """Erase a person: wherever our rows name them as an actor (`user:<name>`, `admin:<name>` in
    session events, the live feed, agent events, task and delivery errors, the admin's log),
    the name becomes a stable pseudonym; the login lockout's failed attempts under the name are
    deleted; their memberships and API tokens go with their user row, which is deleted (the
    sessions they created stay, without a creator). One transaction: all of it or none. Logs
    already written are out of reach (docs/DATA.md)."""
    username = user.get_username()
    alias = pseudonym(user)
    named = re.compile(rf"\b(user|admin):{re.escape(username)}(?![\w.@+-])")

    def rename(text: str) -> str:
        return named.sub(lambda m: f"{m.group(1)}:{alias}", text)

    rows = {}
    with transaction.atomic():
        rows["session events"] = _rename_text(SessionEvent, ["actor", "reason"], username, rename)
        rows["agent events"] = _rename_text(AgentEvent, ["actor", "reason"], username, rename)
        rows["task errors"] = _rename_text(Task, ["error"], username, rename)
        rows["eap delivery errors"] = _rename_text(EapDelivery, ["error"], username, rename)
        rows["feed events"] = _rename_feed(username, rename)
        rows["admin log entries"] = _rename_admin_log(user, username, alias)
        rows["memberships"] = Membership.objects.filter(user=user).count()
        # The login lockout's records of failed logins under the name (django-axes).
        rows["failed logins"] = sum(
            model.objects.filter(username=username).delete()[0] for model in (AccessAttempt, AccessFailureLog)
        )
        get_user_model().objects.filter(pk=user.pk).delete()  # memberships, tokens and sessions' creator with it
    logger.info("user %s erased as %s", user.pk, alias)
    return UserErased(pseudonym=alias, rows=rows)


def _rename_text(model, fields: list[str], username: str, rename) -> int:
    """Rewrite `fields` of the rows that hold `username` (append-only models too: an update,
    not a save). Returns how many rows changed."""
    holding = Q()
    for name in fields:
        holding |= Q(**{f"{name}__contains": username})
    changed = 0
    for row in model.objects.filter(holding).values("pk", *fields).iterator(500):
        new = {name: rename(row[name]) for name in fields if rename(row[name]) != row[name]}
        if new:
            changed += model.objects.filter(pk=row["pk"]).update(**new)
    return changed


def _rename_feed(username: str, rename) -> int:
    """The live feed's copies of events and task errors (written by triggers, as JSON)."""
    changed = 0
    holding = FeedEvent.objects.annotate(text=Cast("data", TextField())).filter(text__contains=username)
    for pk, data in holding.values_list("pk", "data").iterator(500):
        new = {key: rename(value) if isinstance(value, str) else value for key, value in data.items()}
        if new != data:
            changed += FeedEvent.objects.filter(pk=pk).update(data=new)
    return changed


def _rename_admin_log(user, username: str, alias: str) -> int:
    """The admin's log of changes to the user and their memberships names them in its text;
    entries the user made themselves go with the user (LogEntry.user cascades)."""
    types = ContentType.objects.get_for_models(get_user_model(), Membership).values()
    about = LogEntry.objects.filter(content_type__in=types).filter(
        Q(object_repr__contains=username) | Q(change_message__contains=username)
    )
    word = re.compile(rf"(?<![\w.@+-]){re.escape(username)}(?![\w.@+-])")
    changed = 0
    for entry in about.exclude(user=user):
        entry.object_repr = word.sub(alias, entry.object_repr)
        entry.change_message = word.sub(alias, entry.change_message)
        entry.save(update_fields=["object_repr", "change_message"])
        changed += 1
    return changed
