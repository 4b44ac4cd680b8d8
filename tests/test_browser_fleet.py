"""The fleet page in a real Chromium: logged in through the console's login form, it shows the
agents made in the database, every control is reachable with the keyboard, and a drain asks for
confirmation (JavaScript's confirm) before it is made and audited. The screenshot it takes is
docs/screenshots/fleet.png (UPDATE_SCREENSHOTS=1 writes it there)."""

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.utils import timezone

from agents.models import Agent, AgentEvent
from sessions.models import Session
from tasks.models import Task
from tenants.models import Membership, Tenant
from tests.conftest import save_screenshot

ERROR = "ConnectionError: opencode server at 127.0.0.1:4096 refused (password=hunter2)\nTraceback ..."


def a_fleet() -> None:
    now = timezone.now()
    acme = Tenant.objects.create(slug="acme", name="Acme")
    Tenant.objects.create(slug="globex", name="Globex")
    for name, capabilities, status, load, seconds in [
        ("builder-1", ["code_generation", "refactoring"], "busy", 2, 4),
        ("builder-2", ["code_generation", "refactoring"], "online", 0, 9),
        ("reviewer", ["code_review", "security_audit"], "draining", 1, 12),
        ("tester", ["testing"], "offline", 0, 600),
    ]:
        Agent.objects.create(
            name=name, executor="scripted" if name != "tester" else "shell", capabilities=capabilities,
            status=status, current_load=load, concurrency=2, last_heartbeat=now - timedelta(seconds=seconds),
        )  # fmt: skip
    Agent.objects.create(
        name="acme-docs-bot", executor="eap", mode="push", tenant=acme, capabilities=["documentation"],
        status="online", concurrency=4, current_load=1, last_heartbeat=now, endpoint_url="https://bot.acme.example/",
    )  # fmt: skip
    session = Session.objects.create(
        tenant=acme, title="Add rate limiting to payments", requirements="r", status="running"
    )
    for i, (key, capability, status) in enumerate(
        [("design", "system_design", "completed"), ("api", "code_generation", "failed"), ("tests", "testing", "queued"),
         ("store", "code_generation", "queued"), ("review", "code_review", "running")]
    ):  # fmt: skip
        Task.objects.create(
            session=session, key=key, title=key, capability=capability, status=status,
            queued_at=now - timedelta(minutes=4 + i), started_at=now - timedelta(minutes=30 - 5 * i),
            finished_at=now - timedelta(minutes=1) if status in ("completed", "failed") else None,
            error=ERROR if status == "failed" else "",
        )  # fmt: skip


def log_in(page, live_server, username: str, password: str) -> None:
    page.goto(f"{live_server.url}/console/login/?next=/console/fleet/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/console/fleet/")


def focused(page) -> str:
    """What has the keyboard's focus: its id, or its text."""
    return page.evaluate("() => document.activeElement.id || document.activeElement.textContent.trim()")


def test_the_fleet_page_shows_the_agents_and_tab_reaches_the_tenant_switcher_and_the_drain_button(page, live_server):
    a_fleet()
    operator = get_user_model().objects.create_user("ops", password="correct horse battery", is_staff=True)
    Membership.objects.create(user=operator, tenant=Tenant.objects.get(slug="acme"), role="operator")
    Membership.objects.create(user=operator, tenant=Tenant.objects.get(slug="globex"), role="viewer")
    page.set_viewport_size({"width": 1280, "height": 800})

    log_in(page, live_server, "ops", "correct horse battery")

    names = page.locator("#agents tbody th[scope=row]").all_text_contents()
    assert [name.split()[0] for name in names] == ["acme-docs-bot", "builder-1", "builder-2", "reviewer", "tester"]
    assert page.locator("#agents .badge.s-draining").text_content() == "draining"
    assert "hunter2" not in page.content()
    assert save_screenshot(page, "fleet").read_bytes().startswith(b"\x89PNG")

    seen = []
    for _ in range(60):
        page.keyboard.press("Tab")
        seen.append(focused(page))
        if seen[-1].startswith("Drain"):
            break
    assert "tenant-switch" in seen
    assert seen[-1] == "Drain acme-docs-bot"


def test_a_drain_from_the_fleet_page_asks_first_and_is_audited(page, live_server):
    a_fleet()
    get_user_model().objects.create_user("root", password="correct horse battery", is_staff=True)
    log_in(page, live_server, "root", "correct horse battery")
    answers = iter([False, True])
    asked = []

    def answer(dialog):
        asked.append(dialog.message)
        dialog.accept() if next(answers) else dialog.dismiss()

    page.on("dialog", answer)
    drain = page.locator("tr", has_text="builder-2").get_by_role("button", name="Drain builder-2")

    drain.click()  # dismissed: nothing happens
    assert Agent.objects.get(name="builder-2").status == "online"
    page.locator(f"#reason-drain-{Agent.objects.get(name='builder-2').pk}").fill("disk full")
    drain.click()
    page.wait_for_selector("text=Draining builder-2.")

    assert asked == ["Drain builder-2? It finishes what it runs and takes nothing new until resumed."] * 2
    assert Agent.objects.get(name="builder-2").status == "draining"
    event = AgentEvent.objects.get(agent_name="builder-2")
    assert (event.actor, event.reason) == ("user:root", "disk full")
    assert page.locator("tr", has_text="builder-2").get_by_role("button", name="Resume builder-2").is_visible()
