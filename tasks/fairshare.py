"""Fair share of the shared capability queues across tenants (docs/ROUTING.md, "Fair share").

A broker queue is first in, first out: once one tenant has put 400 messages on `cap.<x>`, another
tenant's message waits behind all of them, whatever its priority. So a tenant may only have its
share of a capability's slots in flight; the rest of its ready work waits in the database and is
released as slots free up:

- in flight, per tenant and capability: its tasks on the shared queues whose message is out and
  not finished (queued with a message, or running), whoever sent it, the database or a canvas -
  except a backlog's (below);
- a canvas sends its own messages without asking, never more at once than its widest group: a
  session runs a canvas if that peak width fits in its tenant's room when it is dispatched
  (reserve_canvas; a group it sends later, once its upstream finishes, may take the tenant over
  its room by at most that width), and is released by the database otherwise;
- a backlog: a canvas that does not fit, of a tenant that holds nothing for its capabilities,
  while no other tenant has work for them. It goes out whole, below every share's broker priority
  (messages.backlog_priority), so that it only fills slots the shares leave free: a tenant who
  comes later, or the tenant's own later work, is within its share and consumed first. Its
  messages count against no share;
- the limit: `ceil(slots * FAIR_SHARE_BURST * weight / total weight)`, at least 1, where slots is
  the concurrency of the live, undrained agents with the capability and the total weight is that
  of the tenants with work in flight, held or in a backlog for it (so a tenant alone gets every
  slot). While a backlog waits for the capability, `floor(slots * weight / total weight)`, at
  least 1: no burst (the backlog fills a slot that frees up), and the shares leave the backlog's
  tenant its own weight's worth of slots;
- held: a ready task released by the database that has no message yet (status queued,
  message_id ''). When a slot frees up, the tenant furthest below its weighted share sends its
  next held task, most urgent session first (weighted round robin).

run_task messages within a share all carry the same broker priority (messages.run_task_options):
across tenants, the order is the share's; within a tenant, the session priority orders what it
releases, and among backlogs the session priority orders them too.
Decisions for one capability are taken under a transaction-level advisory lock, so two releases
that race never both take the last slot.
"""

import math
from collections import Counter
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q

from sessions.models import ACTIVE

from . import statements
from .models import HELD, Task

# Tasks whose message goes to a shared queue: a pinned task waits on its own agent's queue (or,
# pinned to an external agent, for its pull), which no other tenant's work shares.
SHARED = Q(pinned_agent="")

_ACTIVE = sorted(ACTIVE)

# How a canvas runs (reserve_canvas): within its tenant's share, or as a lone tenant's backlog.
SHARE, BACKLOG = "share", "backlog"

# The capability's slots - the concurrency of its live, undrained agents (Agent.is_live in SQL)
# - and, per tenant with work for it, its weight, what it has in flight, what it holds and what
# it has in flight in backlogs. One row with no tenant when none has work.
LOADS = """
SELECT slots.n, tenant.id, tenant.weight, load.in_flight, load.held, load.backlog
FROM (
    SELECT COALESCE(sum(a.concurrency), 0) AS n FROM agents_agent a
    WHERE a.mode = '' AND a.status IN ('online', 'busy') AND a.capabilities @> jsonb_build_array(%(capability)s::text)
      AND a.last_heartbeat > now() - make_interval(secs => %(offline_after)s)
) slots LEFT JOIN ((
    SELECT tenant_id,
           count(*) FILTER (WHERE out AND NOT in_backlog) AS in_flight,
           count(*) FILTER (WHERE held) AS held,
           count(*) FILTER (WHERE out AND in_backlog) AS backlog
    FROM (
        SELECT s.tenant_id, s.canvas_backlog AND t.via_canvas AS in_backlog,
               t.status = 'running' OR (t.message_id <> '' AND s.status = ANY(%(active)s)) AS out,
               t.status = 'queued' AND t.message_id = '' AND NOT t.via_canvas AND s.status = ANY(%(active)s) AS held
        FROM tasks_task t JOIN agent_sessions_session s ON s.id = t.session_id
        WHERE t.capability = %(capability)s AND t.status IN ('queued', 'running') AND t.pinned_agent = ''
          AND s.id IS DISTINCT FROM %(replanned)s
    ) task
    GROUP BY tenant_id
) load JOIN tenants_tenant tenant ON tenant.id = load.tenant_id) ON true
"""


@dataclass
class Load:
    weight: int
    in_flight: int = 0
    held: int = 0
    backlog: int = 0
    limit: int = 0

    @property
    def room(self) -> int:
        return max(0, self.limit - self.in_flight)


def loads(capability: str, weights: dict[int, int] | None = None, replanned=None) -> dict[int, Load]:
    """Each tenant's load on the capability, with its limit. `weights`: tenants about to send work
    (a new canvas), counted as having work even before they have any. `replanned`: a session
    being dispatched again, whose earlier messages and canvas do not count."""
    params = {
        "capability": capability,
        "active": _ACTIVE,
        "replanned": replanned,
        "offline_after": settings.AGENT_OFFLINE_AFTER_SECONDS,
    }
    with connection.cursor() as cursor:
        cursor.execute(LOADS, params)
        rows = cursor.fetchall()
    slots = max(1, rows[0][0])
    found = {
        tenant: Load(weight, in_flight, held, backlog)
        for _, tenant, weight, in_flight, held, backlog in rows
        if tenant is not None and (in_flight or held or backlog)
    }
    for tenant, weight in (weights or {}).items():
        found.setdefault(tenant, Load(weight))
    total = sum(load.weight for load in found.values())
    backlogged = any(load.backlog for load in found.values())
    for load in found.values():
        if backlogged:
            load.limit = max(1, math.floor(slots * load.weight / total))
        else:
            load.limit = max(1, math.ceil(slots * settings.FAIR_SHARE_BURST * load.weight / total))
    return found


def _lock(capabilities) -> None:
    """Serialize share decisions per capability until the transaction ends (sorted: no deadlock)."""
    with connection.cursor() as cursor:
        for capability in sorted(set(capabilities)):
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"fairshare:{capability}"])


def reserve_canvas(session, widths: dict[str, int], mark) -> str | None:
    """How the session may run a canvas whose peak widths per capability are `widths`: SHARE if
    the tenant holds nothing for those capabilities and the canvas fits in its room now; BACKLOG
    if it does not fit, the tenant holds nothing for them and no other tenant has work for them;
    None if neither: its tasks are released by the database (and held while the tenant has no
    room). `mark(lane)` gives the tasks their message ids under the lock, so that a session
    dispatched meanwhile counts them. The widths are stored on the session: when it settles,
    what it had room for may go to held work."""
    tenant, weight = session.tenant_id, session.tenant.weight
    with transaction.atomic():
        _lock(widths)
        shares = {capability: loads(capability, {tenant: weight}, replanned=session.pk) for capability in widths}
        mine = {capability: found[tenant] for capability, found in shares.items()}
        if all(_fits(load, widths[capability]) for capability, load in mine.items()):
            lane = SHARE
        elif all(not mine[capability].held and found.keys() == {tenant} for capability, found in shares.items()):
            lane = BACKLOG
        else:
            lane = None
        type(session).objects.filter(pk=session.pk).update(
            canvas_width=widths if lane else {}, canvas_backlog=lane == BACKLOG
        )
        mark(lane)
    return lane


def _fits(load: Load, width: int) -> bool:
    return not load.held and load.in_flight + width <= load.limit


def admit(tasks: list[Task], mark) -> tuple[list[Task], set[str]]:
    """Of the queued tasks (the database released them), those their tenants have room for, in
    the given order within a capability; the rest stay held. Returns them, given their message
    ids by `mark` under the lock (see release_held), and the capabilities of those left held: a
    slot that frees up before this commits sees nothing held, so the caller looks again after."""
    by_capability: dict[str, list[Task]] = {}
    for task in tasks:
        by_capability.setdefault(task.capability, []).append(task)
    chosen: list[Task] = []
    held: set[str] = set()
    with transaction.atomic():
        _lock(by_capability)
        for capability, waiting in by_capability.items():
            shares = loads(capability, {t.session.tenant_id: t.session.tenant.weight for t in waiting})
            for task in waiting:
                load = shares[task.session.tenant_id]
                if task.pinned_agent or load.room:
                    load.in_flight += 0 if task.pinned_agent else 1
                    chosen.append(task)
                else:
                    held.add(capability)
        if chosen:
            mark(chosen)
    return chosen, held


def release_held(capability: str, mark) -> list[Task]:
    """The held tasks of the capability to send now, while some tenant with held work has room:
    each next slot goes to the tenant furthest below its weighted share.

    Only the choice is taken under the capability's lock: `mark(tasks)` gives the chosen tasks
    their message ids there (in flight from then on, so a release racing this one counts them),
    and the caller routes and sends them once this commits, which lets the lock go (in
    autocommit, as every finish runs it; inside a transaction of the caller's, the lock lasts
    until that commits). Releases of one capability run after every finish; they wait for each
    other only while they count and choose."""
    with transaction.atomic():
        _lock([capability])
        shares = {tenant: load for tenant, load in loads(capability).items() if load.held and load.room}
        quota: Counter = Counter()
        while shares:
            tenant = min(shares, key=lambda t: (shares[t].in_flight / shares[t].weight, t))
            load = shares[tenant]
            quota[tenant] += 1
            load.in_flight += 1
            load.held -= 1
            if not (load.held and load.room):
                del shares[tenant]
        chosen: list[Task] = []
        for tenant, count in quota.items():
            chosen += (
                Task.objects.filter(HELD, capability=capability, session__tenant_id=tenant, session__status__in=ACTIVE)
                .order_by("-session__priority", "queued_at", "position")
                .select_for_update(of=("self",), skip_locked=True)[:count]
            )
        if chosen:
            mark(chosen)
    return chosen


# HELD in SQL: asked after every finish, where compiling the ORM's query would cost more than
# running it, and planning it each time more than running it too (make bench, B1): a hot-path
# statement, prepared once per connection.
HAS_HELD = """
SELECT EXISTS (SELECT FROM tasks_task WHERE capability = %(capability)s AND status = 'queued' AND message_id = ''
               AND NOT via_canvas AND pinned_agent = '')
"""


def has_held(capability: str) -> bool:
    """Whether any task of the capability is held: one entry of a partial index (Task's
    task_held), however much else of the capability is queued or running."""
    [(held,)] = statements.run(HAS_HELD, {"capability": capability})
    return held


def held_capabilities() -> list[str]:
    return list(Task.objects.filter(HELD).values_list("capability", flat=True).distinct())
