"""In a real browser: an admin creates a user, resets their password, makes them an API token (shown once,
working as a bearer token) and revokes it; a radiologist is kept out of the admin pages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from tests.accounts import PASSWORD, add_user, database_url
from tests.api.conftest import ApiServer, api_server

pytestmark = [pytest.mark.e2e]

NEW_PASSWORD = "a-brand-new-passphrase"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with api_server(tmp_path_factory.mktemp("browser-admin")) as server:
        yield server


def _page(browser: Any, errors: list[str]) -> Any:
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page


def _sign_in(page: Any, server: ApiServer, name: str, password: str) -> None:
    page.goto(f"{server.url}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")


def _studies(server: ApiServer, token: str) -> int:
    rsp = httpx.get(f"{server.url}/api/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return rsp.status_code


def test_admin_resets_a_password_and_makes_and_revokes_a_token(
    browser: Any, server: ApiServer, artifacts: Path
) -> None:
    admin = add_user(database_url({"GATEWAY_DATA_DIR": str(server.data_dir)}), "admin")
    errors: list[str] = []
    page = _page(browser, errors)
    _sign_in(page, server, admin, PASSWORD)
    page.wait_for_url(f"{server.url}/")
    page.click("nav >> text=Users")
    page.wait_for_url(f"{server.url}/admin/users")

    create = page.locator('form[action="/admin/users"]')
    create.locator("input[name=username]").fill("reader")
    create.locator("input[name=full_name]").fill("Dr Reader")
    create.locator("select[name=role]").select_option("radiologist")
    create.locator("input[name=password]").fill(PASSWORD)
    create.locator("button[type=submit]").click()
    page.wait_for_url("**/admin/users?message=*")
    expect(page.locator("p.message")).to_have_text("user reader created")

    reset = page.locator("form.reset-password")
    reset.locator("select[name=username]").select_option("reader")
    reset.locator("input[name=password]").fill(NEW_PASSWORD)
    reset.locator("input[name=password_again]").fill(NEW_PASSWORD + "x")
    reset.locator("button[type=submit]").click()
    expect(page.locator("p.error")).to_have_text("the two passwords differ")
    reset = page.locator("form.reset-password")
    reset.locator("select[name=username]").select_option("reader")
    reset.locator("input[name=password]").fill(NEW_PASSWORD)
    reset.locator("input[name=password_again]").fill(NEW_PASSWORD)
    reset.locator("button[type=submit]").click()
    page.wait_for_url("**/admin/users?message=*")
    expect(page.locator("p.message")).to_have_text("password of reader reset; their sessions ended")
    page.screenshot(path=str(artifacts / "admin-users-reset.png"), full_page=True)

    row = page.locator("tbody tr").filter(has=page.get_by_role("cell", name="reader", exact=True))
    row.get_by_role("link", name="New token").click()
    page.wait_for_url(f"{server.url}/admin/tokens?user=reader#new")
    scopes = page.locator("input[name=scope]")
    expect(scopes).to_have_count(3)  # the radiologist role's: review, studies:read, upload
    page.locator("input[name=scope][value=upload]").uncheck()
    page.locator("form.new-token-form input[name=days]").fill("30")
    page.locator("form.new-token-form input[name=name]").fill("reader's script")
    page.screenshot(path=str(artifacts / "admin-token-form.png"), full_page=True)
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("#new-token")
    secret.wait_for()
    token = secret.input_value()
    assert token.startswith("sgw_") and page.url == f"{server.url}/admin/tokens"  # nothing in the URL
    prefix = token.split("_")[1]
    token_row = page.locator(f'tr[data-prefix="{prefix}"]')
    expect(token_row.locator("td.state")).to_have_text("active")
    expect(token_row).to_contain_text("reader's script")
    expect(token_row.locator(".chip")).to_have_text(["review", "studies:read"])  # upload unchecked
    page.screenshot(path=str(artifacts / "admin-token-created.png"), full_page=True)
    assert _studies(server, token) == 200

    page.goto(f"{server.url}/admin/tokens")  # shown once: not on the page again
    expect(page.locator("#new-token")).to_have_count(0)
    assert token not in page.content()
    page.locator(f'tr[data-prefix="{prefix}"]').get_by_role("button", name="Revoke").click()
    page.wait_for_url("**/admin/tokens?message=*")
    expect(page.locator("p.message")).to_have_text(f"token {prefix} revoked")
    expect(page.locator(f'tr[data-prefix="{prefix}"] td.state')).to_have_text("revoked")
    page.screenshot(path=str(artifacts / "admin-tokens.png"), full_page=True)
    assert _studies(server, token) == 401

    reader = _page(browser, errors)
    _sign_in(reader, server, "reader", PASSWORD)  # the old password no longer works
    expect(reader.locator("p.error")).to_have_text("User name or password not accepted.")
    _sign_in(reader, server, "reader", NEW_PASSWORD)
    reader.wait_for_url(f"{server.url}/")
    for path in ("/admin/users", "/admin/tokens"):
        response = reader.goto(f"{server.url}{path}")
        assert response is not None and response.status == 403, path
        expect(reader.locator("main")).to_contain_text("does not allow this")
    reader.screenshot(path=str(artifacts / "radiologist-tokens-403.png"), full_page=True)
    assert errors == []
    page.context.close()
    reader.context.close()
