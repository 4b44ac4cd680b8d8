"""The console's list pages through Django's test client on the real database and Redis: the
sessions of the current tenant (filters, pages, the live stream's starting position), the tenant
switcher, and the fleet (agents, queues, top errors, slowest tasks, drain and resume, audited)."""

import re
from datetime import timedelta
from html import unescape
from urllib.parse import parse_qs, urlsplit

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from agents.models import Agent, AgentEvent
from sessions import feed
from sessions.models import Session
from tasks.models import Task
from tenants.models import Membership, Tenant

SESSIONS = "/console/"
FLEET = "/console/fleet/"


def member(slug: str, username: str, role: str = Membership.Role.DEVELOPER):
    tenant, _ = Tenant.objects.get_or_create(slug=slug, defaults={"name": slug.title()})
    user, _ = get_user_model().objects.get_or_create(username=username)
    Membership.objects.create(user=user, tenant=tenant, role=role)
    return user


def logged_in(client, user):
    client.force_login(user)
    return client


def make_session(slug: str, title: str, *, status="pending", template="", age=timedelta(0), **fields) -> Session:
    session = Session.objects.create(
        tenant=Tenant.objects.get(slug=slug), title=title, requirements=fields.pop("requirements", "r"),
        status=status, template=template, **fields,
    )  # fmt: skip
    if age:
        Session.objects.filter(pk=session.pk).update(created_at=timezone.now() - age)
    return session


def make_task(session: Session, key: str, status: str = "pending", **fields) -> Task:
    return Task.objects.create(session=session, key=key, title=key, capability=fields.pop("capability", "testing"),
                               status=status, **fields)  # fmt: skip


def titles(response) -> list[str]:
    """The session titles of a list page, in order."""
    return [
        unescape(t) for t in re.findall(r'<tr data-session="[^"]+">\s*<td><a href="[^"]+">([^<]*)</a>', html(response))
    ]


def html(response) -> str:
    return response.content.decode()


@pytest.fixture
def alice(db, client):
    """A developer of acme, logged in, with a session in acme and one in globex (not hers)."""
    user = member("acme", "alice")
    Tenant.objects.create(slug="globex", name="Globex")
    return logged_in(client, user)


# --- login and the root --------------------------------------------------------------------------


@pytest.mark.parametrize("path", [SESSIONS, FLEET])
def test_the_pages_send_a_visitor_to_the_login_first(client, db, path):
    response = client.get(path)

    assert response.status_code == 302
    assert response["Location"] == f"/console/login/?next={path}"


def test_the_root_sends_people_to_the_console(client, db):
    response = client.get("/")

    assert (response.status_code, response["Location"]) == (302, "/console/")


# --- the sessions list ---------------------------------------------------------------------------


def test_the_list_shows_the_current_tenants_sessions_newest_first_with_their_task_counts(alice):
    old = make_session("acme", "Old one", age=timedelta(hours=2))
    new = make_session("acme", "New one", status="running", template="feature")
    make_session("globex", "Not yours")
    for key, status in [("a", "completed"), ("b", "completed"), ("c", "failed"), ("d", "running")]:
        make_task(new, key, status)

    response = alice.get(SESSIONS)

    assert response.status_code == 200
    assert titles(response) == ["New one", "Old one"]
    row = re.search(rf'<tr data-session="{new.pk}">(.*?)</tr>', html(response), re.S).group(1)
    assert f'href="/console/sessions/{new.pk}/"' in row
    assert '<span class="badge s-running" data-status="running">running</span>' in row
    assert "feature" in row
    assert 'data-completed="2" data-total="4">2/4<' in row
    assert 'data-failed="1">1<' in row
    assert f'<time datetime="{new.created_at.isoformat()}' in row.replace("+00:00", "+00:00")
    assert str(old.pk) in html(response)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status=failed", ["Failed feature"]),
        ("status=failed&status=running", ["Running bugfix", "Failed feature"]),
        ("template=bugfix", ["Running bugfix"]),
        ("template=none", ["Completed dag, last week"]),
        ("age=day", ["Running bugfix", "Failed feature"]),
        ("age=week", ["Running bugfix", "Failed feature"]),
        ("age=month", ["Running bugfix", "Failed feature", "Completed dag, last week", "Timed out"]),
        ("q=BUGFIX", ["Running bugfix"]),
        ("q=payments", ["Failed feature"]),  # in the requirements only
        ("failed=on", ["Failed feature", "Timed out"]),
        ("failed=on&template=feature", ["Failed feature"]),
        ("failed=on&status=running", []),
        ("", ["Running bugfix", "Failed feature", "Completed dag, last week", "Timed out"]),
    ],
)
def test_each_filter_narrows_the_list(alice, query, expected):
    make_session("acme", "Timed out", status="timeout", template="refactor", age=timedelta(days=20))
    make_session("acme", "Completed dag, last week", status="completed", age=timedelta(days=8))
    make_session(
        "acme",
        "Failed feature",
        status="failed",
        template="feature",
        requirements="rate-limit payments",
        age=timedelta(hours=3),
    )
    make_session("acme", "Running bugfix", status="running", template="bugfix")
    make_session("globex", "Globex failed bugfix", status="failed", template="bugfix")

    response = alice.get(f"{SESSIONS}?{query}")

    assert response.status_code == 200
    assert titles(response) == expected


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("status=bogus", "Select a valid choice. bogus is not one of the available choices."),
        ("age=century", "Select a valid choice. century is not one of the available choices."),
        ("template=mind_reading", "Select a valid choice."),
        ("older=not-a-cursor", "not a page of this list"),
        ("newer=99999999999999999999-" + "0" * 32, "not a page of this list"),
        ("q=" + "x" * 201, "Ensure this value has at most 200 characters"),
    ],
)
def test_a_filter_that_cannot_be_applied_is_a_400_page_that_says_why(alice, query, says):
    make_session("acme", "Listed otherwise")

    response = alice.get(f"{SESSIONS}?{query}")

    assert response.status_code == 400
    assert says in unescape(html(response))
    assert "These filters cannot be applied" in html(response)
    assert titles(response) == []


def test_pages_follow_each_other_back_and_forth_without_overlap(alice):
    start = timezone.now() - timedelta(hours=1)
    for i in range(60):
        session = make_session("acme", f"s{i:02}")
        Session.objects.filter(pk=session.pk).update(created_at=start + timedelta(seconds=i // 2))  # ties too
    make_session("acme", "not failed", status="completed")  # filtered out on every page

    pages, response = [], alice.get(f"{SESSIONS}?status=pending")
    while True:
        pages.append(titles(response))
        older = re.search(r'<a href="([^"]+)" rel="next">Older</a>', html(response))
        if not older:
            break
        assert "status=pending" in unescape(older.group(1))
        response = alice.get(SESSIONS + unescape(older.group(1)))

    assert [len(page) for page in pages] == [25, 25, 10]
    listed = [title for page in pages for title in page]
    assert sorted(listed) == [f"s{i:02}" for i in range(60)]  # each once
    seconds = [int(title[1:]) // 2 for title in listed]
    assert seconds == sorted(seconds, reverse=True)  # newest first; ties in a fixed order across pages
    newer = re.search(r'<a href="([^"]+)" rel="prev">Newer</a>', html(response)).group(1)
    assert titles(alice.get(SESSIONS + unescape(newer))) == pages[1]


def test_the_stream_continues_exactly_after_what_the_page_rendered(transactional_db, alice):
    # Committed for real: a position is a snapshot of committed transactions (sessions/feed.py).
    session = make_session("acme", "Watched")
    user = get_user_model().objects.get(username="alice")

    page = html(alice.get(SESSIONS))
    stream = unescape(re.search(r'data-stream="([^"]+)"', page).group(1))
    session.transition("queued", reason="started", actor="test")

    url = urlsplit(stream)
    query = parse_qs(url.query)
    assert url.path == "/api/v1/stream/"
    assert query["tenant"] == ["acme"]
    position = feed.Position.parse(query["after"][0])
    allowed, placed, _ = feed.read(tenant=session.tenant_id, user=user.pk, position=position)
    assert allowed
    # The creation was rendered already; only the change after the page is new.
    assert [(event["kind"], event["data"]["to"]) for event, _ in placed] == [("session", "queued")]


@pytest.mark.parametrize("rows", [5, 50])
def test_the_list_costs_the_same_queries_however_many_sessions_and_tasks(alice, django_assert_max_num_queries, rows):
    for i in range(rows):
        session = make_session("acme", f"s{i}")
        make_task(session, "a", "completed")
        make_task(session, "b", "failed")

    # The Django session, the user, the memberships, then in one snapshot its position, the
    # page's rows and their task counts (and the savepoint around them).
    with django_assert_max_num_queries(8):
        response = alice.get(f"{SESSIONS}?status=pending&q=s")

    assert len(titles(response)) == min(rows, 25)


def test_a_user_of_no_tenant_is_told_so(client, db):
    logged_in(client, get_user_model().objects.create_user("loner"))

    response = client.get(SESSIONS)

    assert response.status_code == 200
    assert "You are a member of no tenant" in html(response)


# --- the tenant switcher -------------------------------------------------------------------------


def test_switching_tenant_lists_the_other_tenants_sessions_and_returns_to_the_page(alice):
    Membership.objects.create(
        user=get_user_model().objects.get(username="alice"), tenant=Tenant.objects.get(slug="globex"), role="viewer"
    )
    make_session("acme", "Acme's")
    make_session("globex", "Globex's")
    assert titles(alice.get(SESSIONS)) == ["Acme's"]  # the first tenant by slug

    response = alice.post("/console/tenant/", {"tenant": "globex", "next": "/console/?status=pending"})

    assert (response.status_code, response["Location"]) == (302, "/console/?status=pending")
    after = alice.get(SESSIONS)
    assert titles(after) == ["Globex's"]
    assert "Showing tenant globex." in html(after)


def test_switching_to_a_tenant_one_is_not_a_member_of_is_a_404_and_changes_nothing(alice):
    make_session("acme", "Acme's")

    response = alice.post("/console/tenant/", {"tenant": "globex", "next": "/console/"})

    assert response.status_code == 404
    assert alice.post("/console/tenant/", {"tenant": "nowhere"}).status_code == 404
    assert titles(alice.get(SESSIONS)) == ["Acme's"]


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/console/", "javascript:alert(1)", ""])
def test_switching_tenant_never_redirects_off_the_site(alice, target):
    response = alice.post("/console/tenant/", {"tenant": "acme", "next": target})

    assert (response.status_code, response["Location"]) == (302, "/console/")


def test_the_switcher_takes_only_a_post(alice):
    assert alice.get("/console/tenant/?tenant=acme").status_code == 405


def test_the_switcher_needs_the_csrf_token(db):
    from django.test import Client

    browser = logged_in(Client(enforce_csrf_checks=True), member("acme", "carol"))

    assert browser.post("/console/tenant/", {"tenant": "acme"}).status_code == 403


# --- the fleet -----------------------------------------------------------------------------------


def make_agent(name: str, tenant: str | None = None, **fields) -> Agent:
    fields = {"executor": "scripted", "capabilities": ["testing"], "status": "online",
              "last_heartbeat": timezone.now(), **fields}  # fmt: skip
    if tenant is not None:
        fields |= {"tenant": Tenant.objects.get(slug=tenant), "mode": "pull", "executor": "eap"}
    return Agent.objects.create(name=name, **fields)


def agent_names(response) -> list[str]:
    return re.findall(r'<tr data-agent="\d+">\s*<th scope="row">([\w-]+)', html(response))


def section(response, table_id: str) -> str:
    return re.search(rf'<table [^>]*id="{table_id}">(.*?)</table>', html(response), re.S).group(1)


def test_the_fleet_shows_the_platforms_workers_and_the_current_tenants_agents_only(alice):
    make_agent("builder", capabilities=["code_generation", "testing"], current_load=1, concurrency=4,
               hostname="gpu-07.internal", last_heartbeat=timezone.now() - timedelta(seconds=30))  # fmt: skip
    make_agent("acme-ext", tenant="acme", hostname="ext.acme.example")
    make_agent("globex-ext", tenant="globex")

    response = alice.get(FLEET)

    assert response.status_code == 200
    assert agent_names(response) == ["acme-ext", "builder"]
    row = re.search(r'<tr data-agent="\d+">\s*<th scope="row">builder.*?</tr>', html(response), re.S).group(0)
    assert '<span class="badge s-online">online</span>' in row
    assert "30 s ago" in row
    assert "1/4" in row
    assert "code_generation, testing" in row
    assert "Scripted" in row
    assert "gpu-07.internal" not in html(response)  # where the platform runs is for staff
    assert "ext.acme.example" in html(response)  # the tenant's own agent


def test_the_queues_show_depth_and_oldest_wait_per_capability_and_who_takes_them(alice):
    make_agent("tester", capabilities=["testing"])
    make_agent("silent", capabilities=["testing"], last_heartbeat=timezone.now() - timedelta(hours=1))
    session = make_session("acme", "Busy", status="running")
    other = make_session("globex", "Theirs", status="running")
    now = timezone.now()
    make_task(session, "t1", "queued", queued_at=now - timedelta(minutes=7))
    make_task(session, "t2", "queued", queued_at=now - timedelta(minutes=2))
    make_task(other, "t3", "queued", queued_at=now - timedelta(seconds=30))  # the queues are the platform's
    make_task(session, "r1", "running", capability="testing")
    make_task(session, "d1", "queued", capability="documentation", queued_at=now - timedelta(hours=3))

    queues = section(alice.get(FLEET), "queues")

    testing = re.search(r'data-capability="testing">(.*?)</tr>', queues, re.S).group(1)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", testing)
    assert cells == ["3", "7 min", "1", "1"]  # waiting, oldest, running, online (the silent one is not)
    documentation = re.search(r'data-capability="documentation">(.*?)</tr>', queues, re.S).group(1)
    assert "3.0 h" in documentation
    assert "0 (nobody takes these)" in documentation


def test_top_errors_are_grouped_by_first_line_redacted_and_of_the_current_tenant_only(alice, settings):
    session = make_session("acme", "Failing", status="failed")
    now = timezone.now()
    trace = f"Traceback (most recent call last):\n  {settings.SECRET_KEY}"
    errors = [f"connect to db failed: password=hunter2 at 10.0.0.{i}:5432\n{trace}" for i in range(3)] + [
        f"upload rejected, key {settings.SECRET_KEY} refused",
        "timed out after 120 s",
        "timed out after 300 s",
    ]
    for i, error in enumerate(errors):
        make_task(session, f"t{i}", "failed", error=error, finished_at=now - timedelta(minutes=i))
    make_task(session, "old", "failed", error="ancient failure", finished_at=now - timedelta(days=2))
    make_task(make_session("globex", "Theirs", status="failed"), "g", "failed", error="globex only", finished_at=now)

    response = alice.get(FLEET)
    page, table = html(response), section(response, "errors")

    assert "hunter2" not in page
    assert settings.SECRET_KEY not in page
    rows = re.findall(r"<tr><td><code>(.*?)</code></td><td[^>]*>(\d+)</td>", table)
    assert [(unescape(line), int(count)) for line, count in rows] == [
        ("connect to db failed: password=[redacted] at N:N", 3),
        ("timed out after N s", 2),
        ("upload rejected, key [redacted] refused", 1),
    ]
    assert "ancient failure" not in page and "globex only" not in page


def test_the_slowest_tasks_of_the_last_day_link_to_their_session(alice):
    session = make_session("acme", "Slow one", status="running")
    now = timezone.now()
    for key, minutes in [("quick", 1), ("slowest", 50), ("middle", 20)]:
        make_task(
            session,
            key,
            "completed",
            started_at=now - timedelta(minutes=minutes + 1),
            finished_at=now - timedelta(minutes=1),
        )
    make_task(
        session, "yesterday", "completed", started_at=now - timedelta(days=3), finished_at=now - timedelta(days=2)
    )
    make_task(
        make_session("globex", "Theirs"), "theirs", "failed", started_at=now - timedelta(hours=5), finished_at=now
    )

    table = section(alice.get(FLEET), "slowest")

    assert re.findall(r"<tr>\s*<td>(\w+) ", table) == ["slowest", "middle", "quick"]
    assert f'href="/console/sessions/{session.pk}/"' in table
    assert "50 min" in table


@pytest.mark.parametrize("rows", [5, 50])
def test_the_fleet_costs_the_same_queries_however_many_agents_and_tasks(alice, django_assert_max_num_queries, rows):
    session = make_session("acme", "Many", status="running")
    now = timezone.now()
    for i in range(rows):
        agent = make_agent(f"agent-{i:02}", capabilities=["testing", f"{['code_review', 'debugging'][i % 2]}"])
        push = make_agent(f"push-{i:02}", tenant="acme", mode="push", endpoint_url="http://127.0.0.1:9/")
        make_task(session, f"q{i}", "queued", queued_at=now)
        make_task(
            session,
            f"f{i}",
            "failed",
            error=f"boom {i}",
            agent=agent,
            started_at=now - timedelta(seconds=i),
            finished_at=now,
        )
        AgentEvent.objects.create(
            agent=push, agent_name=push.name, action="drain", actor="user:x", from_status="online", to_status="draining"
        )

    # The Django session, the user, the memberships; the agents, the queues, the errors, the
    # slowest tasks, the latest actions. The circuits come from Redis, in one round trip.
    with django_assert_max_num_queries(8):
        response = alice.get(FLEET)

    assert len(agent_names(response)) == 2 * rows


# --- drain and resume ----------------------------------------------------------------------------


@pytest.fixture
def staff(db, client):
    user = get_user_model().objects.create_user("root", is_staff=True)
    return logged_in(client, user)


def steer(client, agent: Agent, action: str, **data):
    return client.post(f"/console/fleet/agents/{agent.pk}/{action}/", {"confirm": "yes", **data})


def test_staff_drain_and_resume_a_platform_worker_and_each_is_audited(staff):
    agent = make_agent("builder")

    drained = steer(staff, agent, "drain", reason="kernel upgrade")

    assert (drained.status_code, drained["Location"]) == (302, FLEET)
    assert Agent.objects.get(pk=agent.pk).status == "draining"
    page = staff.get(FLEET)
    assert "Draining builder." in html(page)
    assert "kernel upgrade" in section(page, "actions") and "user:root" in section(page, "actions")
    assert f'action="/console/fleet/agents/{agent.pk}/resume/"' in html(page)

    steer(staff, agent, "resume")

    assert Agent.objects.get(pk=agent.pk).status == "online"
    events = AgentEvent.objects.filter(agent=agent).order_by("id")
    assert [(e.action, e.actor, e.from_status, e.to_status, e.reason) for e in events] == [
        ("drain", "user:root", "online", "draining", "kernel upgrade"),
        ("resume", "user:root", "draining", "online", ""),
    ]


def test_without_confirmation_a_page_asks_first_and_nothing_changes(staff):
    agent = make_agent("builder")

    response = staff.post(f"/console/fleet/agents/{agent.pk}/drain/", {"reason": "why not"})

    assert response.status_code == 200
    assert "Drain builder?" in html(response)
    assert 'name="confirm" value="yes"' in html(response) and 'value="why not"' in html(response)
    assert Agent.objects.get(pk=agent.pk).status == "online"
    assert not AgentEvent.objects.exists()


def test_an_operator_drains_the_tenants_external_agent_from_the_console(client, db):
    operator = logged_in(client, member("acme", "olga", role="operator"))
    agent = make_agent("acme-ext", tenant="acme")
    platform = make_agent("builder")

    page = html(operator.get(FLEET))
    assert f"/console/fleet/agents/{agent.pk}/drain/" in page
    assert f"/console/fleet/agents/{platform.pk}/drain/" not in page  # staff's

    assert steer(operator, agent, "drain").status_code == 302
    assert Agent.objects.get(pk=agent.pk).status == "draining"
    assert AgentEvent.objects.get().actor == "user:olga"
    assert steer(operator, platform, "drain").status_code == 403
    assert Agent.objects.get(pk=platform.pk).status == "online"


@pytest.mark.parametrize("role", ["viewer", "developer"])
def test_viewers_and_developers_see_no_buttons_and_may_not_steer(client, db, role):
    user = logged_in(client, member("acme", "vic", role=role))
    agents = [make_agent("acme-ext", tenant="acme"), make_agent("builder")]

    assert "/drain/" not in html(user.get(FLEET))
    for agent in agents:
        assert steer(user, agent, "drain").status_code == 403
    assert set(Agent.objects.values_list("status", flat=True)) == {"online"}
    assert not AgentEvent.objects.exists()


def test_staff_do_not_steer_a_tenants_agent_they_cannot_see(staff):
    Tenant.objects.create(slug="globex", name="Globex")
    agent = make_agent("globex-ext", tenant="globex")

    assert steer(staff, agent, "drain").status_code == 404
    assert Agent.objects.get(pk=agent.pk).status == "online"


def test_an_unknown_action_is_a_404_and_a_get_a_405(staff):
    agent = make_agent("builder")

    assert steer(staff, agent, "reboot").status_code == 404
    assert staff.get(f"/console/fleet/agents/{agent.pk}/drain/").status_code == 405
    assert Agent.objects.get(pk=agent.pk).status == "online"
    assert not AgentEvent.objects.exists()


def test_the_platforms_staff_stay_anonymous_to_tenants_in_the_audit(alice):
    agent = make_agent("builder")
    from agents import services

    services.drain_agent(agent, actor="user:root", reason="password=hunter2 rotation")

    actions = section(alice.get(FLEET), "actions")
    assert "platform staff" in actions and "user:root" not in actions
    assert "hunter2" not in actions


def test_staff_of_no_tenant_see_and_steer_the_platforms_workers_only(staff):
    Tenant.objects.create(slug="globex", name="Globex")
    worker = make_agent("builder", hostname="gpu-07.internal")
    make_agent("globex-ext", tenant="globex")

    response = staff.get(FLEET)

    assert agent_names(response) == ["builder"]
    assert "gpu-07.internal" in html(response)  # staff see where the platform runs
    assert f"/console/fleet/agents/{worker.pk}/drain/" in html(response)
    assert 'id="errors"' not in html(response)  # a tenant's errors need a tenant
