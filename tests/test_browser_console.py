"""The session page in a real Chromium, against real workers and the real event stream process:
a session followed live from pending to completed, the task panel, a viewer refused, a cancel
from the page, a stream cut and resumed without a gap or a duplicate, and secrets kept out of the
page and the stream. One test also saves the screenshot of docs/screenshots/session.png.

The page is served by pytest-django's live server on 127.0.0.1 (tests/conftest.py), the stream by
Stack.stream on another port of the same host, so the login cookie reaches both; the stream lets
the page's origin read it with credentials (STREAM_ALLOWED_ORIGINS)."""

import json
import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from sessions.models import FeedEvent, Session, SessionEvent
from tasks.models import Task

from .conftest import (
    ALL_BUILD,
    Stack,
    create_and_start,
    member_client,
    member_token,
    running_stack,
    save_screenshot,
    wait_until,
)
from .test_browser_smoke import png_size
from .test_console_session import layered_dag

pytestmark = pytest.mark.e2e
PASSWORD = "console-test-password"
WAIT_MS = 60_000


@dataclass
class Console:
    stack: Stack
    url: str  # the live server: the console's pages
    stream_url: str
    stream_env: dict

    def page_of(self, session_id) -> str:
        return f"/console/sessions/{session_id}/"


@pytest.fixture
def console(request, page, live_server, settings):
    env = {"STREAM_ALLOWED_ORIGINS": live_server.url, "STREAM_HEARTBEAT_SECONDS": "1"}
    with running_stack(request) as stack:
        stream_url = stack.stream(env=env)
        settings.STREAM_URL = stream_url
        yield Console(stack, live_server.url, stream_url, env)
        report = getattr(request.node, "report_call", None)
        if report is not None and report.passed:
            # Leave the page, closing its stream: the stream process then stops at once, not
            # after its graceful timeout. (A failed test's page stays for its screenshot.)
            page.goto("about:blank")


def log_in(page, base_url: str, username: str, role: str, then: str, tenant: str = "acme") -> None:
    """A member of the tenant with `role` logs in through the console's form and lands on `then`."""
    member_token(tenant, username, role)
    user = get_user_model().objects.get(username=username)
    user.set_password(PASSWORD)
    user.save()
    page.goto(f"{base_url}/console/login/?next={then}")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("form.login button[type=submit]")
    page.wait_for_url(f"{base_url}{then}")


def create(payload: dict) -> str:
    response = member_client("acme", "maker").post("/api/v1/sessions/", payload, format="json")
    assert response.status_code == 201, response.content
    return response.json()["id"]


def start(session_id: str) -> None:
    assert member_client("acme", "maker").post(f"/api/v1/sessions/{session_id}/start/").status_code == 202


def spec(key: str, deps: list[str], seconds: float = 0.3, **params) -> dict:
    return {
        "key": key,
        "title": key.replace("-", " ").capitalize(),
        "capability": "code_generation",
        "depends_on": deps,
        "params": {"duration_s": seconds, **params},
    }


def timeline_ids(page) -> list[int]:
    return [int(i) for i in page.locator("#timeline li").evaluate_all("rows => rows.map(r => r.dataset.id)")]


def feed_ids(session_id) -> list[int]:
    return list(FeedEvent.objects.filter(session_id=session_id).order_by("id").values_list("id", flat=True))


def expect_timeline_complete(page, session_id) -> None:
    """The timeline holds every event of the session's feed, each once."""
    expected = feed_ids(session_id)
    expect(page.locator("#timeline li")).to_have_count(len(expected), timeout=WAIT_MS)
    shown = timeline_ids(page)
    assert len(shown) == len(set(shown)), f"duplicates in the timeline: {shown}"
    assert sorted(shown) == expected, f"gap: shown {sorted(shown)}, feed {expected}"


# --- (a) followed live --------------------------------------------------------------------------


def test_a_session_is_followed_from_pending_to_completed_without_a_reload(page, console):
    console.stack.agent("all-rounder", ALL_BUILD, concurrency=2, duration=1.0)
    tasks = [spec("design", []), spec("api", ["design"]), spec("ui", ["design"]), spec("review", ["api", "ui"])]
    session_id = create({"title": "Live", "requirements": "watch it", "tasks": tasks})
    log_in(page, console.url, "walter", "viewer", console.page_of(session_id))
    badge = page.locator("#session-status")
    expect(badge).to_have_text("pending")
    expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    page.evaluate("window.sameDocument = true")  # gone if the page reloads

    start(session_id)

    expect(badge).to_have_text("running", timeout=WAIT_MS)
    design = page.locator(f"#task-{Task.objects.get(session_id=session_id, key='design').pk}")
    expect(design).to_have_class(re.compile(r"\bs-running\b"), timeout=WAIT_MS)
    expect(design.locator(".status-text")).to_have_text("running")
    expect(design).to_have_class(re.compile(r"\bs-completed\b"), timeout=WAIT_MS)
    expect(badge).to_have_text("completed", timeout=WAIT_MS)
    expect(page.locator(".node.s-completed")).to_have_count(4)
    assert page.locator(".node .status-text").all_text_contents() == ["completed"] * 4
    expect(page.locator("#progress-text")).to_have_text("4 of 4 tasks finished")
    expect(page.locator("#allowed-now")).to_have_text("none")
    assert page.evaluate("window.sameDocument") is True
    expect_timeline_complete(page, session_id)


# --- (b) the panel ------------------------------------------------------------------------------


def test_a_click_on_a_node_shows_its_output_in_the_panel(page, console):
    console.stack.agent("all-rounder", ALL_BUILD, duration=0.2)
    tasks = [spec("design", [], output="Use a token bucket per API key."), spec("api", ["design"])]
    session_id = create_and_start(member_client("acme", "maker"), {"requirements": "panel", "tasks": tasks})
    log_in(page, console.url, "walter", "viewer", console.page_of(session_id))
    expect(page.locator("#session-status")).to_have_text("completed", timeout=WAIT_MS)
    design, api = (Task.objects.get(session_id=session_id, key=key) for key in ("design", "api"))

    page.focus(".graph-scroll")
    page.keyboard.press("Tab")  # the first task of the drawing is the next stop
    expect(page.locator(f"#task-{design.pk} a")).to_be_focused()
    page.click(f"#task-{design.pk} a")

    panel = page.locator("#panel")
    expect(panel.locator("pre.output")).to_have_text("Use a token bucket per API key.")
    expect(panel.locator("h2")).to_have_text("Task design")
    expect(panel).to_contain_text("1 of 3")
    expect(panel).to_be_focused()
    assert f"task={design.pk}" in page.url
    # The keyboard way: the node is a link that takes the focus, and Enter opens it.
    node = page.locator(f"#task-{api.pk} a")
    node.focus()
    expect(node).to_be_focused()
    page.keyboard.press("Enter")
    expect(panel.locator("h2")).to_have_text("Task api")
    expect(panel.locator("pre.output")).to_have_text("simulated code_generation for 'Api'")
    expect(page.locator(f"#task-{api.pk}")).to_have_class(re.compile(r"\bselected\b"))
    panel.locator(".close-panel").click()
    expect(panel).to_contain_text("Select a task in the graph")
    expect(node).to_be_focused()  # back where the reader was
    assert "task=" not in page.url


# --- (c) a viewer -------------------------------------------------------------------------------


def test_a_viewer_sees_no_action_and_a_forged_post_is_refused(page, console):
    session_id = create({"title": "Not yours to stop", "requirements": "viewer", "tasks": [spec("one", [])]})
    log_in(page, console.url, "walter", "viewer", console.page_of(session_id))

    expect(page.locator(".actions")).to_contain_text("you can follow this session, not change it")
    expect(page.locator(".actions form")).to_have_count(0)
    expect(page.locator(".actions button")).to_have_count(0)
    csrf = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    forged = page.request.post(
        f"{console.url}/console/sessions/{session_id}/cancel/",
        form={"csrfmiddlewaretoken": csrf, "confirm": "yes"},
        headers={"Referer": page.url},
    )

    assert forged.status == 403
    assert "CSRF" not in forged.text()  # refused for the role, not for a missing token
    assert Session.objects.get(pk=session_id).status == Session.Status.PENDING
    assert not SessionEvent.objects.filter(session_id=session_id, actor="user:walter").exists()


# --- (d) cancel from the page --------------------------------------------------------------------


def test_an_operator_cancels_a_running_session_from_the_page(page, console):
    console.stack.agent("builder", ALL_BUILD, concurrency=1)
    tasks = [spec("slow", [], seconds=60), spec("after", ["slow"])]
    session_id = create_and_start(member_client("acme", "maker"), {"requirements": "stop me", "tasks": tasks})
    log_in(page, console.url, "olivia", "operator", console.page_of(session_id))
    expect(page.locator("#session-status")).to_have_text("running", timeout=WAIT_MS)
    asked: list[str] = []

    def accept(dialog) -> None:
        asked.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    cancel = page.locator("form[data-action=cancel] button")
    expect(cancel).to_be_visible()
    cancel.click()

    expect(page.locator("#session-status")).to_have_text("stopped", timeout=WAIT_MS)
    expect(page.locator(".messages")).to_contain_text("Done: cancel by user:olivia. The session is now stopped.")
    assert asked and asked[0].startswith("Cancel this session?")
    assert Session.objects.get(pk=session_id).status == Session.Status.STOPPED
    assert SessionEvent.objects.filter(session_id=session_id).latest("id").actor == "user:olivia"
    expect(page.locator("#timeline")).to_contain_text("by user:olivia")
    expect(page.locator("form[data-action=retry]")).to_be_visible()  # what a stopped session allows
    slow = Task.objects.get(session_id=session_id, key="slow")
    expect(page.locator(f"#task-{slow.pk} .status-text")).to_have_text("cancelled", timeout=WAIT_MS)


# --- (e) the stream cut ----------------------------------------------------------------------------


def test_after_the_stream_is_cut_the_page_resumes_with_no_gap_and_no_duplicate(page, console):
    console.stack.agent("builder", ALL_BUILD, concurrency=1, duration=0.7)
    keys = [f"step-{n}" for n in range(1, 11)]
    tasks = [spec(key, keys[i - 1 : i], seconds=0.7) for i, key in enumerate(keys)]
    session_id = create({"title": "Cut", "requirements": "resume", "tasks": tasks})
    log_in(page, console.url, "walter", "viewer", console.page_of(session_id))
    expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    first = Task.objects.get(session_id=session_id, key="step-1")

    start(session_id)
    expect(page.locator(f"#task-{first.pk}")).to_have_class(re.compile(r"\bs-completed\b"), timeout=WAIT_MS)
    console.stack.stop_one("stream")
    expect(page.locator("#live")).to_have_attribute("data-state", "reconnecting", timeout=WAIT_MS)
    shown_when_cut = len(timeline_ids(page))
    # The session goes on while nobody streams.
    wait_until(lambda: len(feed_ids(session_id)) >= shown_when_cut + 3, what="events while the stream is down")
    assert len(timeline_ids(page)) == shown_when_cut
    console.stack.stream(env=console.stream_env, port=urlsplit(console.stream_url).port)

    expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    expect(page.locator("#session-status")).to_have_text("completed", timeout=WAIT_MS)
    expect_timeline_complete(page, session_id)


# --- (f) secrets --------------------------------------------------------------------------------


def planted() -> tuple[str, list[str]]:
    text = (
        f"key {settings.SECRET_KEY} db postgres://u:pw-planted-9@h/db password=hunter2 "
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEplantedbody\n-----END RSA PRIVATE KEY-----"
    )
    return text, [settings.SECRET_KEY, "pw-planted-9", "hunter2", "MIIEplantedbody"]


def stream_text(console: Console, page, session_id, messages: int) -> str:
    """The session's stream from its start, read with the browser's login cookie, up to
    `messages` events."""
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    url = f"{console.stream_url}/api/v1/sessions/{session_id}/stream/"
    lines: list[str] = []
    deadline = time.monotonic() + 30
    with httpx.stream("GET", url, cookies=cookies, timeout=10) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            lines.append(line)
            # The first data line is the stream's start message's.
            if sum(line.startswith("data:") for line in lines) > messages or time.monotonic() > deadline:
                break
    return "\n".join(lines)


def test_a_secret_in_a_tasks_output_or_error_reaches_neither_the_page_nor_the_stream(page, console):
    console.stack.agent("builder", ALL_BUILD, duration=0.2)
    text, secrets = planted()
    tasks = [spec("leak", [], output=text), spec("after", ["leak"])]
    session_id = create({"title": "Leaky", "requirements": "secrets", "tasks": tasks})
    log_in(page, console.url, "walter", "viewer", console.page_of(session_id))
    expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=WAIT_MS)
    start(session_id)
    expect(page.locator("#session-status")).to_have_text("completed", timeout=WAIT_MS)
    leak, after = (Task.objects.get(session_id=session_id, key=key) for key in ("leak", "after"))
    # The executor printed them; they were redacted before they were stored (tasks/running.py).
    assert settings.SECRET_KEY not in leak.result["output"] and "[redacted]" in leak.result["output"]
    # Rows stored before write-time redaction still hold secrets: the page redacts on the way out.
    Task.objects.filter(pk=leak.pk).update(result={**leak.result, "output": text})

    # An error with the same secrets, written as a worker writes one: the stream carries errors.
    Task.objects.filter(pk=after.pk).update(status=Task.Status.FAILED, error=f"boom: {text}")
    expect(page.locator("#timeline")).to_contain_text("error: boom: key [redacted]", timeout=WAIT_MS)
    page.click(f"#task-{leak.pk} a")
    expect(page.locator("#panel pre.output")).to_contain_text("key [redacted] db postgres://u:[redacted]@h/db")
    page.click(f"#task-{after.pk} a")
    expect(page.locator("#panel pre.error-text")).to_contain_text("boom: key [redacted]")

    html = page.content()
    streamed = stream_text(console, page, session_id, len(feed_ids(session_id)))
    assert '"error": "boom: key [redacted]' in streamed
    for secret in secrets:
        assert secret not in html, secret
        assert secret not in streamed, secret
    assert "[redacted]" in html


# --- (g) the screenshot ---------------------------------------------------------------------------


def test_the_session_page_screenshot(page, console, request):
    """A mid-sized DAG part done, one task running, one failed and its dependent skipped, the
    panel open. Saved in the test's directory; with UPDATE_SCREENSHOTS=1 also as
    docs/screenshots/session.png."""
    console.stack.agent("builder", ALL_BUILD, concurrency=3, duration=0.3)
    tasks = [
        spec("design", [], output="Token bucket per API key; 100 requests/min; Redis for the counters."),
        spec("schema", ["design"]),
        spec("limiter", ["design"], output="Added payments/limits.py: TokenBucket, check_rate()."),
        spec("middleware", ["limiter", "schema"]),
        spec("api-errors", ["limiter"]),
        spec("unit-tests", ["limiter"]),
        spec("load-test", ["middleware"], seconds=120),
        spec("perf-budget", ["middleware"], fail_rate=1.0),
        spec("dashboards", ["perf-budget"]),
        spec("docs", ["api-errors", "unit-tests"]),
        spec("review", ["load-test", "docs"]),
        spec("release-notes", ["review"]),
    ]
    for task in tasks:
        task["max_attempts"] = 1
    session_id = create({"title": "Rate limiting for the payments API", "requirements": "screenshot", "tasks": tasks})
    page.set_viewport_size({"width": 1280, "height": 800})
    log_in(page, console.url, "olivia", "operator", console.page_of(session_id))
    expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=WAIT_MS)

    start(session_id)
    expect(page.locator(".node.s-completed")).to_have_count(7, timeout=WAIT_MS)
    expect(page.locator(".node.s-failed")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator(".node.s-running")).to_have_count(1, timeout=WAIT_MS)
    expect(page.locator(".node.s-skipped")).to_have_count(1, timeout=WAIT_MS)
    limiter = Task.objects.get(session_id=session_id, key="limiter")
    page.click(f"#task-{limiter.pk} a")
    expect(page.locator("#panel pre.output")).to_contain_text("TokenBucket")
    page.click("button[data-zoom=fit]")  # the whole DAG in view
    expect(page.locator("#zoom-level")).not_to_have_text("100%")
    page.evaluate("window.scrollTo(0, 0)")

    assert png_size(save_screenshot(page, "session").read_bytes()) == (1280, 800)
    assert json.loads(page.locator("#session-live").text_content())["session"] == session_id
    # Stop the long task now rather than when the agent is shut down.
    assert member_client("acme", "maker").post(f"/api/v1/sessions/{session_id}/cancel/").status_code == 202


# --- a large DAG ----------------------------------------------------------------------------------


def test_a_200_task_dag_zooms_and_filters_at_once(page, live_server):
    session_id = create(layered_dag(20, 10))
    tasks = Task.objects.filter(session_id=session_id)
    tasks.filter(key__regex=r"^t[0-4]-").update(status=Task.Status.COMPLETED)
    tasks.filter(key__in=["t5-3", "t5-7"]).update(status=Task.Status.FAILED, error="boom")
    page.set_viewport_size({"width": 1280, "height": 800})
    log_in(page, live_server.url, "walter", "viewer", f"/console/sessions/{session_id}/")
    page.evaluate("window.sameDocument = true")
    nodes = page.locator(".node")
    expect(nodes).to_have_count(200)
    width = float(page.locator("#dag").get_attribute("width"))

    page.click("a[data-view=failed]")
    expect(page.locator(".node:visible")).to_have_count(2)
    assert "view=failed" in page.url
    page.click("a[data-view=hide-completed]")
    expect(page.locator(".node:visible")).to_have_count(150)
    page.click("a[data-view=all]")
    expect(page.locator(".node:visible")).to_have_count(200)
    assert "view=" not in page.url

    page.focus("button[data-zoom=out]")
    page.keyboard.press("Enter")
    expect(page.locator("#zoom-level")).to_have_text("80%")
    assert float(page.locator("#dag").get_attribute("width")) < width
    page.click("button[data-zoom=fit]")
    box = page.locator(".graph-scroll").bounding_box()
    drawn = page.locator("#dag").bounding_box()
    assert drawn["width"] <= box["width"] and drawn["height"] <= box["height"]
    assert page.evaluate("window.sameDocument") is True
