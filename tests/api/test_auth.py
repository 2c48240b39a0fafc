"""Sign-in, sessions, CSRF, roles and tokens against `gateway serve` on a real port (uvicorn, SQLite)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from api.main import PUBLIC_PATHS, create_app
from api.security import CONTENT_SECURITY_POLICY, SESSION_COOKIE
from core.db import make_engine, make_sessionmaker
from core.settings import Settings
from tests.accounts import PASSWORD, add_user, database_url, issue_token
from tests.api.conftest import ApiServer, api_server

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("auth")
    settings = {"AUTH__LOGIN_MAX_FAILURES": "3", "ORTHANC__WEBHOOK_SECRET": "s3cret"}
    with api_server(root, **settings) as server:
        yield server


def _db(server: ApiServer) -> str:
    return database_url({"GATEWAY_DATA_DIR": str(server.data_dir)})


def _bearer(server: ApiServer, role: str, scopes: list[str] | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(_db(server), role, scopes)}"}


@contextmanager
def _signed_in(server: ApiServer, role: str, **user: str) -> Iterator[tuple[httpx.Client, str]]:
    """A browser-like client signed in as a new user with ``role``; and the session's CSRF token."""
    name = add_user(_db(server), role, **user)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, _sign_in(client, name)


def _sign_in(client: httpx.Client, name: str) -> str:
    rsp = client.post("/login", data={"username": name, "password": PASSWORD, "next": "/"})
    assert rsp.status_code == 303 and rsp.headers["location"] == "/", rsp.text
    home = client.get("/", headers={"Accept": "text/html"})
    assert home.status_code == 200
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', home.text)
    assert csrf is not None
    return csrf.group(1)


def _api_routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    """The app's route table, included routers walked into (FastAPI wraps them)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (included := getattr(route, "original_router", None)) is not None:
            yield from _api_routes(included.routes)


def _routes(tmp: Path) -> list[tuple[str, str]]:
    """(method, path) of every route of the app, path parameters filled in."""
    app = create_app(make_sessionmaker(make_engine(f"sqlite:///{tmp / 'routes.db'}")), Settings(data_dir=tmp))
    found = []
    for route in _api_routes(app.routes):
        if route.path.startswith(PUBLIC_PATHS):
            continue
        path = re.sub(r"\{[^}]+\}", "1.2.3", route.path)
        found += [(method, path) for method in sorted(route.methods or ())]
    return found


def test_every_route_but_the_public_ones_needs_sign_in(server: ApiServer, tmp_path: Path) -> None:
    routes = _routes(tmp_path)
    assert {p for _, p in routes} >= {
        "/api/studies",
        "/dicomweb/studies",
        "/api/audit",
        "/admin/users",
    }
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in routes:
            for accept in ("application/json", "text/html"):
                rsp = client.request(method, path, headers={"Accept": accept})
                page = (
                    accept == "text/html" and method == "GET" and not path.startswith(("/api/", "/dicomweb/"))
                )
                if page:
                    assert rsp.status_code == 303, (method, path)
                    assert rsp.headers["location"].startswith("/login?next=%2F"), (method, path)
                else:
                    assert rsp.status_code == 401, (method, path, accept, rsp.text)
        assert client.get("/healthz").status_code == 200
        assert client.get("/login").status_code == 200
        assert client.get("/static/app.css").status_code == 200


def test_bad_credentials_get_401_not_details(server: ApiServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for header in (
            "Bearer sgw_000000000000_" + "A" * 43,
            "Bearer nonsense",
            "Basic YWxpY2U6eA==",
            "Bearer",
        ):
            rsp = client.get("/api/studies", headers={"Authorization": header})
            assert rsp.status_code == 401 and rsp.headers["www-authenticate"] == "Bearer", header
        rsp = client.get("/api/studies", cookies={SESSION_COOKIE: "forged"})
        assert rsp.status_code == 401


def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(server: ApiServer) -> None:
    name = add_user(_db(server), "radiologist")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        rsp = client.post("/login", data={"username": name, "password": PASSWORD, "next": "/api/me"})
        assert rsp.status_code == 303 and rsp.headers["location"] == "/api/me"
        cookie = rsp.headers["set-cookie"]
        assert f"{SESSION_COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert "Secure" not in cookie  # plain HTTP here; set over HTTPS (GATEWAY_AUTH__SECURE_COOKIES)
        me = client.get("/api/me").json()
        assert me == {
            "username": name,
            "role": "radiologist",
            "scopes": ["review", "studies:read", "upload"],
            "via": "session",
        }
        page = client.get("/", headers={"Accept": "text/html"}).text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert csrf is not None
        assert client.post("/logout").status_code == 403  # no CSRF token
        rsp = client.post("/logout", data={"csrf_token": csrf.group(1)})
        assert rsp.status_code == 303 and rsp.headers["location"] == "/login"
        client.cookies.clear()
        # the old cookie no longer works even if a client kept it
        stale = re.search(rf"{SESSION_COOKIE}=([^;]+)", cookie)
        assert stale is not None
        assert client.get("/api/me", cookies={SESSION_COOKIE: stale.group(1)}).status_code == 401


def test_failed_sign_ins_say_nothing_specific_and_are_throttled(server: ApiServer) -> None:
    name = add_user(_db(server), "radiologist")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        wrong_password = client.post("/login", data={"username": name, "password": "wrong-password"})
        wrong_user = client.post("/login", data={"username": "nobody-here", "password": PASSWORD})
        assert wrong_password.status_code == wrong_user.status_code == 401
        message = "User name or password not accepted."
        assert message in wrong_password.text and message in wrong_user.text
        client.post("/login", data={"username": name, "password": "wrong-again"})
        client.post("/login", data={"username": name, "password": "and-again"})
        # the 4th attempt within the window, right password or not: 429, no session
        rsp = client.post("/login", data={"username": name, "password": PASSWORD})
        assert rsp.status_code == 429 and "Too many failed sign-ins" in rsp.text
        assert SESSION_COOKIE not in rsp.headers.get("set-cookie", "")
    audit = httpx.get(
        f"{server.url}/api/audit", params={"action": "login."}, headers=server.headers, timeout=30
    ).json()
    mine = [e for e in audit["events"] if e["detail"].get("user") == name]
    assert [e["action"] for e in mine][:2] == ["login.throttled", "login.failure"]
    assert all(e["client"] == "127.0.0.1" for e in mine)


def test_next_never_leaves_the_site(server: ApiServer) -> None:
    name = add_user(_db(server), "radiologist")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
            rsp = client.post("/login", data={"username": name, "password": PASSWORD, "next": target})
            assert rsp.status_code == 303 and rsp.headers["location"] == "/", target


def test_roles_and_scopes_get_403(server: ApiServer) -> None:
    radiologist = _bearer(server, "radiologist")
    data = _bearer(server, "data")
    stow_only = _bearer(server, "admin", ["stow"])
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/api/studies", headers=radiologist).status_code == 200
        assert client.get("/api/users", headers=radiologist).status_code == 403
        assert client.get("/api/audit", headers=radiologist).status_code == 403
        assert client.get("/api/studies", headers=data).status_code == 403
        assert client.post("/dicomweb/studies", headers=radiologist).status_code == 403
        assert client.get("/api/studies", headers=stow_only).status_code == 403
        assert client.get("/api/me", headers=stow_only).json()["scopes"] == ["stow"]
    with _signed_in(server, "radiologist") as (browser, _):
        rsp = browser.get("/admin/users", headers={"Accept": "text/html"})
        assert rsp.status_code == 403 and "does not allow" in rsp.text and "<html" in rsp.text


def test_csrf_and_cross_site_requests_are_refused(server: ApiServer) -> None:
    form = {"username": "", "role": "radiologist", "password": PASSWORD}
    with _signed_in(server, "admin") as (browser, csrf):
        assert browser.post("/admin/users", data={**form, "username": "nocsrf"}).status_code == 403
        wrong = {**form, "username": "wrongcsrf", "csrf_token": "x" * 43}
        assert browser.post("/admin/users", data=wrong).status_code == 403
        good = {**form, "username": "crosssite", "csrf_token": csrf}
        evil = browser.post("/admin/users", data=good, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403 and "cross-origin" in evil.text
        site = browser.post("/admin/users", data=good, headers={"Sec-Fetch-Site": "cross-site"})
        assert site.status_code == 403 and "cross-site" in site.text
        rsp = browser.post(
            "/admin/users", data=good, headers={"Origin": server.url, "Sec-Fetch-Site": "same-origin"}
        )
        assert rsp.status_code == 303, rsp.text
        names = {u["username"] for u in browser.get("/api/users").json()}
        assert "crosssite" in names and not names & {"nocsrf", "wrongcsrf"}
        # a sign-in form posted from another site is refused too (login CSRF)
        rsp = httpx.post(
            f"{server.url}/login",
            data={"username": "crosssite", "password": PASSWORD},
            headers={"Origin": "https://evil.example"},
        )
        assert rsp.status_code == 403


def test_pages_escape_what_users_typed_and_send_a_strict_csp(server: ApiServer) -> None:
    payload = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    add_user(_db(server), "radiologist", full_name=payload)
    with _signed_in(server, "admin") as (browser, _):
        rsp = browser.get("/admin/users", headers={"Accept": "text/html"})
    assert rsp.status_code == 200
    assert payload not in rsp.text and "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;&lt;img" in rsp.text
    for r in (rsp, httpx.get(f"{server.url}/healthz"), httpx.get(f"{server.url}/api/studies")):
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert rsp.headers["cache-control"] == "no-store"
    assert not re.search(r"<script(?![^>]*\bsrc=)", rsp.text) and " style=" not in rsp.text


def test_admin_manages_users_and_reads_the_audit_trail(server: ApiServer) -> None:
    admin = server.headers
    with httpx.Client(base_url=server.url, headers=admin, timeout=30) as client:
        body = {"username": "carol", "role": "radiologist", "password": PASSWORD, "full_name": "Dr Carol"}
        assert client.post("/api/users", json=body).status_code == 201
        assert client.post("/api/users", json=body).status_code == 400  # exists
        assert client.post("/api/users", json={**body, "username": "dave", "role": "god"}).status_code == 400
        carol = httpx.Client(base_url=server.url, timeout=30)
        assert carol.post("/login", data={"username": "carol", "password": PASSWORD}).status_code == 303
        assert carol.get("/api/me").status_code == 200
        assert client.post("/api/users/carol/disable").json()["disabled"] is True
        assert carol.get("/api/me").status_code == 401  # her session ended
        assert carol.post("/login", data={"username": "carol", "password": PASSWORD}).status_code == 401
        assert client.post("/api/users/nobody/disable").status_code == 404
        events = client.get("/api/audit", params={"action": "user."}).json()["events"]
        assert {(e["action"], e["detail"]["user"]) for e in events} >= {
            ("user.create", "carol"),
            ("user.disable", "carol"),
        }
        csv = client.get("/api/audit.csv", params={"action": "user.disable"})
        assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
        assert "attachment" in csv.headers["content-disposition"]
        lines = csv.text.strip().splitlines()
        assert lines[0] == "id,at,actor,action,study_instance_uid,client,detail"
        assert any(",user.disable," in line and "user=carol" in line for line in lines[1:])
        page = httpx.get(f"{server.url}/api/audit", headers=_bearer(server, "radiologist"))
        assert page.status_code == 403


def test_the_last_admin_cannot_be_disabled(tmp_path: Path) -> None:
    with api_server(tmp_path) as server, httpx.Client(base_url=server.url, headers=server.headers) as client:
        me = client.get("/api/me").json()["username"]
        rsp = client.post(f"/api/users/{me}/disable")
        assert rsp.status_code == 409 and "last active admin" in rsp.json()["detail"]


def test_webhook_checks_its_secret_before_the_body(server: ApiServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for body in (b"not json", b'{"study": 1}', b"{}"):
            rsp = client.post(
                "/api/orthanc/webhook", content=body, headers={"Content-Type": "application/json"}
            )
            assert rsp.status_code == 401, body
        rsp = client.post("/api/orthanc/webhook", content=b"not json", headers={"X-Gateway-Secret": "s3cret"})
        assert rsp.status_code == 422
        big = b'{"study": "' + b"a" * 10_000 + b'"}'
        rsp = client.post("/api/orthanc/webhook", content=big, headers={"X-Gateway-Secret": "s3cret"})
        assert rsp.status_code == 413


def test_openapi_schema_lists_the_json_routes_for_signed_in_users(server: ApiServer) -> None:
    assert httpx.get(f"{server.url}/api/openapi.json").status_code == 401
    schema = httpx.get(f"{server.url}/api/openapi.json", headers=server.headers).json()
    assert {"/api/me", "/api/users", "/api/audit", "/api/studies", "/dicomweb/studies"} <= set(
        schema["paths"]
    )
    assert "/login" not in schema["paths"]
