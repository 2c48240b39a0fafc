"""In a real browser: sign in, the admin pages, a radiologist kept out of them, sign out; what users typed
renders as text under the strict CSP (no script of theirs runs)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.accounts import PASSWORD, add_user, database_url
from tests.api.conftest import ApiServer, api_server

pytestmark = [pytest.mark.e2e]

XSS = '<script>window.pwned=1</script>"><img src=x onerror="window.pwned=2">'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with api_server(tmp_path_factory.mktemp("browser")) as server:
        yield server


def _sign_in(page: Any, server: ApiServer, name: str, password: str = PASSWORD) -> None:
    page.goto(f"{server.url}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def test_admin_signs_in_sees_users_and_audit_and_signs_out(
    browser: Any, server: ApiServer, artifacts: Path
) -> None:
    db = database_url({"GATEWAY_DATA_DIR": str(server.data_dir)})
    admin = add_user(db, "admin", full_name="Admin Person")
    add_user(db, "radiologist", full_name=XSS)
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    page.goto(f"{server.url}/admin/users")  # signed out: sent to sign in, and back afterwards
    assert page.url == f"{server.url}/login?next=%2Fadmin%2Fusers"
    page.fill("input[name=username]", admin)
    page.fill("input[name=password]", "wrong-password")
    page.click("button[type=submit]")
    assert page.locator("p.error").inner_text() == "User name or password not accepted."
    page.screenshot(path=str(artifacts / "login-failed.png"), full_page=True)
    page.fill("input[name=username]", admin)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{server.url}/admin/users")
    assert page.locator("text=Research decision support only").count() == 1
    cell = page.locator("td", has_text="<script>window.pwned=1</script>")
    assert cell.count() == 1  # shown as text
    assert page.evaluate("window.pwned") is None  # and never run
    page.screenshot(path=str(artifacts / "admin-users.png"), full_page=True)

    page.fill("input[name=username]", "newreader")
    page.fill("input[name=full_name]", "New Reader")
    page.select_option("select[name=role]", "radiologist")
    page.fill("form.grid input[name=password]", PASSWORD)
    page.click("form.grid button[type=submit]")
    page.wait_for_url(f"{server.url}/admin/users?message=*")
    assert page.locator("p.message").inner_text() == "user newreader created"

    page.click("nav >> text=Audit")
    page.wait_for_url(f"{server.url}/admin/audit")
    assert page.locator("td", has_text="user.create").count() >= 1
    page.fill("input[name=action]", "login.")
    page.click("form.filters button[type=submit]")
    page.wait_for_url("**/admin/audit?*action=login.*")
    actions = page.locator("tbody tr td:nth-child(3)").all_inner_texts()
    assert actions and set(actions) <= {"login.success", "login.failure"}
    page.screenshot(path=str(artifacts / "admin-audit.png"), full_page=True)

    page.click("text=Sign out")
    page.wait_for_url(f"{server.url}/login")
    page.goto(f"{server.url}/admin/audit")
    assert page.url.startswith(f"{server.url}/login?next=")
    assert errors == []
    context.close()


def test_radiologist_cannot_open_admin_pages(browser: Any, server: ApiServer, artifacts: Path) -> None:
    name = add_user(database_url({"GATEWAY_DATA_DIR": str(server.data_dir)}), "radiologist")
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, server, name)
    page.wait_for_url(f"{server.url}/")
    assert page.locator("nav >> text=Users").count() == 0
    response = page.goto(f"{server.url}/admin/users")
    assert response is not None and response.status == 403
    assert "does not allow this" in page.locator("main").inner_text()
    page.screenshot(path=str(artifacts / "radiologist-403.png"), full_page=True)
    context.close()
