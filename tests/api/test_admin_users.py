"""Administration of passwords and API tokens against `gateway serve` on a real port (uvicorn, SQLite):
the JSON routes with an admin's token, the pages' forms with a signed-in admin and its CSRF token."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.accounts import PASSWORD, add_user, database_url, issue_token
from tests.api.conftest import ApiServer, api_server

pytestmark = [pytest.mark.e2e]

NEW_PASSWORD = "a-brand-new-passphrase"
TOKEN = re.compile(r"sgw_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with api_server(tmp_path_factory.mktemp("admin-users")) as server:
        yield server


@pytest.fixture
def admin(server: ApiServer) -> Iterator[httpx.Client]:
    """The API as a script with an admin's token calls it."""
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as client:
        yield client


def _db(server: ApiServer) -> str:
    return database_url({"GATEWAY_DATA_DIR": str(server.data_dir)})


@contextmanager
def _browser(server: ApiServer, name: str, password: str = PASSWORD) -> Iterator[tuple[httpx.Client, str]]:
    """A browser-like client signed in as ``name``; and its session's CSRF token (from a page's form)."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        rsp = client.post("/login", data={"username": name, "password": password, "next": "/"})
        assert rsp.status_code == 303, rsp.text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/", headers=_HTML).text)
        assert csrf is not None
        yield client, csrf.group(1)


_HTML = {"Accept": "text/html"}


def _signs_in(server: ApiServer, name: str, password: str) -> bool:
    rsp = httpx.post(f"{server.url}/login", data={"username": name, "password": password}, timeout=30)
    return rsp.status_code == 303


def _events(admin: httpx.Client, action: str, **detail: Any) -> list[dict[str, Any]]:
    events = admin.get("/api/audit", params={"action": action}).json()["events"]
    return [e for e in events if all(e["detail"].get(k) == v for k, v in detail.items())]


def _studies(server: ApiServer, token: str) -> int:
    rsp = httpx.get(f"{server.url}/api/studies", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return rsp.status_code


def test_admin_resets_a_password_over_json(server: ApiServer, admin: httpx.Client) -> None:
    name = add_user(_db(server), "radiologist")
    with _browser(server, name) as (user, _):
        assert user.get("/api/me").status_code == 200
        rsp = admin.post(f"/api/users/{name}/password", json={"password": NEW_PASSWORD})
        assert rsp.status_code == 200 and rsp.json()["username"] == name
        assert user.get("/api/me").status_code == 401  # the session the old password opened has ended
    assert not _signs_in(server, name, PASSWORD)
    assert _signs_in(server, name, NEW_PASSWORD)
    [event] = _events(admin, "user.reset_password", user=name)
    assert event["actor"].startswith("token:") and event["client"] == "127.0.0.1"

    short = admin.post(f"/api/users/{name}/password", json={"password": "short"})
    assert short.status_code == 400 and "at least 10" in short.json()["detail"]
    assert admin.post("/api/users/nobody-here/password", json={"password": NEW_PASSWORD}).status_code == 404
    assert len(_events(admin, "user.reset_password", user=name)) == 1  # refusals change and record nothing
    assert _signs_in(server, name, NEW_PASSWORD)


def test_admin_resets_passwords_with_the_form(server: ApiServer, admin: httpx.Client) -> None:
    db = _db(server)
    me, other = add_user(db, "admin"), add_user(db, "data")
    form = {"username": other, "password": NEW_PASSWORD, "password_again": NEW_PASSWORD}
    with _browser(server, other) as (victim, _), _browser(server, me) as (browser, csrf):
        page = browser.get("/admin/users", headers=_HTML).text
        assert 'action="/admin/users/password"' in page and 'minlength="10"' in page
        assert browser.post("/admin/users/password", data=form).status_code == 403  # no CSRF token
        differ = browser.post(
            "/admin/users/password", data={**form, "password_again": "x" * 12, "csrf_token": csrf}
        )
        assert differ.status_code == 400 and "the two passwords differ" in differ.text
        assert victim.get("/api/me").status_code == 200  # nothing changed so far
        rsp = browser.post("/admin/users/password", data={**form, "csrf_token": csrf})
        assert rsp.status_code == 303 and rsp.headers["location"].startswith("/admin/users?message=")
        assert f"password of {other} reset" in browser.get(rsp.headers["location"], headers=_HTML).text
        assert victim.get("/api/me").status_code == 401
        assert _signs_in(server, other, NEW_PASSWORD) and not _signs_in(server, other, PASSWORD)
        # an admin's own reset ends the admin's own sessions too, this one included
        own = {"username": me, "password": NEW_PASSWORD, "password_again": NEW_PASSWORD, "csrf_token": csrf}
        assert browser.post("/admin/users/password", data=own).status_code == 303
        assert browser.get("/api/me").status_code == 401
    assert _signs_in(server, me, NEW_PASSWORD)
    assert {e["detail"]["user"] for e in _events(admin, "user.reset_password")} >= {me, other}
    assert all(e["actor"] == f"user:{me}" for e in _events(admin, "user.reset_password", user=other))


def test_tokens_over_json(server: ApiServer, admin: httpx.Client) -> None:
    name = add_user(_db(server), "radiologist")
    body = {"user": name, "scopes": ["studies:read"], "days": 7, "name": "nightly script"}
    rsp = admin.post("/api/tokens", json=body)
    assert rsp.status_code == 201 and rsp.headers["cache-control"] == "no-store"
    made = rsp.json()
    token, prefix = made["token"], made["prefix"]
    assert TOKEN.fullmatch(token) and token.startswith(f"sgw_{prefix}_")
    assert made["user"] == name and made["scopes"] == ["studies:read"] and made["state"] == "active"
    expires = datetime.fromisoformat(made["expires_at"])
    assert timedelta(days=6, hours=23) < expires - datetime.now(UTC) <= timedelta(days=7)
    assert _studies(server, token) == 200
    assert httpx.get(f"{server.url}/api/me", headers={"Authorization": f"Bearer {token}"}).json()[
        "scopes"
    ] == ["studies:read"]

    listing = admin.get("/api/tokens")
    assert listing.status_code == 200 and token not in listing.text
    [row] = [t for t in listing.json() if t["prefix"] == prefix]
    assert row["name"] == "nightly script" and row["last_used_at"] is not None and row["state"] == "active"

    default = admin.post("/api/tokens", json={"user": name}).json()  # all the role's scopes, the default days
    assert default["scopes"] == ["review", "studies:read", "upload"]
    assert datetime.fromisoformat(default["expires_at"]) - datetime.now(UTC) > timedelta(days=364)
    forever = admin.post("/api/tokens", json={"user": name, "days": 0}).json()
    assert forever["expires_at"] is None
    for bad, status in (
        ({"user": name, "scopes": ["stow"]}, 400),  # beyond the role
        ({"user": name, "scopes": ["root"]}, 400),
        ({"user": "nobody-here"}, 400),
        ({"user": name, "scopes": []}, 422),
        ({"user": name, "days": -1}, 422),
    ):
        refused = admin.post("/api/tokens", json=bad)
        assert refused.status_code == status, (bad, refused.text)

    revoked = admin.post(f"/api/tokens/{prefix}/revoke")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    assert _studies(server, token) == 401
    assert admin.post(f"/api/tokens/{prefix}/revoke").status_code == 200  # again: nothing changes
    assert admin.post("/api/tokens/000000000000/revoke").status_code == 404
    [created] = _events(admin, "token.create", prefix=prefix)
    assert created["detail"]["user"] == name and created["detail"]["scopes"] == ["studies:read"]
    assert len(_events(admin, "token.revoke", prefix=prefix)) == 1


def test_tokens_with_the_forms(server: ApiServer, admin: httpx.Client) -> None:
    db = _db(server)
    name = add_user(db, "radiologist")
    with _browser(server, add_user(db, "admin")) as (browser, csrf):
        users = browser.get("/admin/users", headers=_HTML).text
        assert 'href="/admin/tokens"' in users and f'href="/admin/tokens?user={name}#new"' in users
        page = browser.get("/admin/tokens", params={"user": name}, headers=_HTML)
        assert page.status_code == 200
        offered = re.findall(r'name="scope" value="([^"]+)"', page.text)
        assert offered == ["review", "studies:read", "upload"]  # the role's scopes only
        assert browser.get("/admin/tokens", params={"user": "nobody-here"}, headers=_HTML).status_code == 404

        form = {"user": name, "scope": ["studies:read", "review"], "days": "30", "name": "from the page"}
        assert browser.post("/admin/tokens", data=form).status_code == 403  # no CSRF token
        rsp = browser.post("/admin/tokens", data={**form, "csrf_token": csrf}, headers=_HTML)
        assert rsp.status_code == 201 and "location" not in rsp.headers
        assert rsp.headers["cache-control"] == "no-store"
        [token] = set(TOKEN.findall(rsp.text))  # shown once, in the page's body only
        prefix = token.split("_")[1]
        assert _studies(server, token) == 200
        [made] = [t for t in admin.get("/api/tokens").json() if t["prefix"] == prefix]
        assert made["scopes"] == ["review", "studies:read"] and made["user"] == name
        again = browser.get("/admin/tokens", headers=_HTML).text
        assert token not in again and f'data-prefix="{prefix}"' in again and "from the page" in again

        beyond = browser.post("/admin/tokens", data={**form, "scope": ["stow"], "csrf_token": csrf})
        assert beyond.status_code == 400 and "does not allow stow" in beyond.text
        none = browser.post("/admin/tokens", data={"user": name, "days": "1", "csrf_token": csrf})
        assert none.status_code == 400 and "choose at least one scope" in none.text

        assert browser.post(f"/admin/tokens/{prefix}/revoke").status_code == 403  # no CSRF token
        assert _studies(server, token) == 200
        rsp = browser.post(f"/admin/tokens/{prefix}/revoke", data={"csrf_token": csrf})
        assert rsp.status_code == 303 and rsp.headers["location"].startswith("/admin/tokens?message=")
        assert _studies(server, token) == 401
        done = browser.get(rsp.headers["location"], headers=_HTML).text
        assert f"token {prefix} revoked" in done
        row = re.search(rf'data-prefix="{prefix}">(.*?)</tr>', done, re.S)
        assert row is not None and ">revoked<" in row.group(1) and "Revoke</button>" not in row.group(1)
        missing = browser.post("/admin/tokens/000000000000/revoke", data={"csrf_token": csrf}, headers=_HTML)
        assert missing.status_code == 404
    assert _events(admin, "token.create", prefix=prefix) and _events(admin, "token.revoke", prefix=prefix)
    assert token not in (server.data_dir.parent / "gateway.log").read_text()  # never logged


def test_disabling_a_user_stops_their_tokens_and_sessions(server: ApiServer, admin: httpx.Client) -> None:
    name = add_user(_db(server), "radiologist")
    token = admin.post("/api/tokens", json={"user": name}).json()
    with _browser(server, name) as (user, _):
        assert user.get("/api/me").status_code == 200 and _studies(server, token["token"]) == 200
        assert admin.post(f"/api/users/{name}/disable").status_code == 200
        assert user.get("/api/me").status_code == 401
        assert _studies(server, token["token"]) == 401
        [row] = [t for t in admin.get("/api/tokens").json() if t["prefix"] == token["prefix"]]
        assert row["state"] == "user disabled"
        refused = admin.post("/api/tokens", json={"user": name})
        assert refused.status_code == 400 and "is disabled" in refused.json()["detail"]
        assert admin.post(f"/api/users/{name}/enable").status_code == 200
        assert _studies(server, token["token"]) == 200  # not revoked: it works again with its user
        assert user.get("/api/me").status_code == 401  # the session did not come back


def test_non_admins_get_403_on_every_new_route(server: ApiServer) -> None:
    db = _db(server)
    name = add_user(db, "radiologist")
    kept = issue_token(db, "radiologist")
    prefix = kept.split("_")[1]
    routes = [
        ("GET", "/api/tokens", None),
        ("POST", "/api/tokens", {"user": name}),
        ("POST", f"/api/tokens/{prefix}/revoke", None),
        ("POST", f"/api/users/{name}/password", {"password": NEW_PASSWORD}),
        ("GET", "/admin/tokens", None),
    ]
    for role, scopes in (("radiologist", None), ("data", None), ("admin", ["stow", "metrics"])):
        headers = {"Authorization": f"Bearer {issue_token(db, role, scopes)}"}
        for method, path, body in routes:
            rsp = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=30)
            assert rsp.status_code == 403, (role, method, path)
    with _browser(server, add_user(db, "radiologist")) as (browser, csrf):
        forms = [
            ("/admin/tokens", {"user": name, "scope": "review", "days": "1"}),
            (f"/admin/tokens/{prefix}/revoke", {}),
            (
                "/admin/users/password",
                {"username": name, "password": NEW_PASSWORD, "password_again": NEW_PASSWORD},
            ),
        ]
        for path, form in forms:
            assert browser.post(path, data={**form, "csrf_token": csrf}).status_code == 403, path
        page = browser.get("/admin/tokens", headers=_HTML)
        assert page.status_code == 403 and "does not allow" in page.text and "<html" in page.text
    assert _signs_in(server, name, PASSWORD) and _studies(server, kept) == 200  # nothing of it happened
