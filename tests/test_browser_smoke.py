"""A real Chromium against the real admin, through a real HTTP server: the browser fixtures of
tests/conftest.py work end to end (and so does the admin's login form with its CSRF cookie)."""

import struct

from django.contrib.auth import get_user_model

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """The width and height in a PNG's header (its first chunk, IHDR), checking that it is one."""
    assert data[:8] == PNG_SIGNATURE, data[:8]
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert (length, kind) == (13, b"IHDR")
    return width, height


def test_an_operator_logs_in_to_the_admin_and_sees_its_index(page, live_server, tmp_path):
    get_user_model().objects.create_superuser("operator", password="correct horse battery")

    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "correct horse battery")
    page.click("input[type=submit]")

    page.wait_for_url(f"{live_server.url}/admin/")
    assert page.text_content("#content h1") == "Site administration"
    assert page.text_content("#user-tools strong") == "operator"
    assert page.locator('a[href="/admin/agent_sessions/session/"]').count() > 0
    screenshot = tmp_path / "admin-index.png"
    page.screenshot(path=screenshot)
    assert png_size(screenshot.read_bytes()) == (page.viewport_size["width"], page.viewport_size["height"])
