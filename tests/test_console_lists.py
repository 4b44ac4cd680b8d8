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


@pytest.mark.parametrize("path", [SESSIONS])
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
