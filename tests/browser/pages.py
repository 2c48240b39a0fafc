"""Helpers the browser tests share."""

from __future__ import annotations

from typing import Any

import pytest

from tests.accounts import PASSWORD, add_user
from tests.review_site import Site


def sign_in(
    browser: Any,
    site: Site,
    role: str = "radiologist",
    full_name: str | None = None,
    viewport: tuple[int, int] = (1400, 1000),
) -> Any:
    """A page of a new browser context, signed in as a new user with ``role``; page errors fail the test."""
    name = add_user(site.db, role, full_name=full_name)
    page = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]}).new_page()
    page.on("pageerror", lambda exc: pytest.fail(f"script error on the page: {exc}"))
    page.goto(f"{site.url}/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{site.url}/")
    return page
