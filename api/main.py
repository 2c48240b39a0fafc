"""The HTTP API application."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from api import security
from api.deps import SessionDep
from api.metrics import metrics_registry
from api.pages import NOTICE, STATIC_DIR, page
from api.routes import (
    admin,
    audit,
    auth,
    decisions,
    deliveries,
    dicomweb,
    exports,
    health,
    metrics,
    models,
    report,
    review,
    studies,
    study_admin,
    upload,
)
from api.routes.exports import Exporter
from api.routes.health import ReadinessCheck
from api.routes.upload import DiscProposer
from api.security import Authenticated
from core.settings import Settings
from core.storage import Storage
from orthanc import webhook as orthanc_webhook

#: Routes anyone may call: the liveness and readiness probes, signing in, the pages' stylesheets and scripts;
#: and /metrics, from this host only (api.routes.metrics).
PUBLIC_PATHS = ("/healthz", "/readyz", "/login", "/static", "/metrics")


def create_app(
    session_factory: sessionmaker[Session],
    settings: Settings,
    *,
    exporter: Exporter | None = None,
    disc_proposer: DiscProposer | None = None,
    checks: Mapping[str, ReadinessCheck] | None = None,
) -> FastAPI:
    """The HTTP API and pages; ``exporter`` makes label exports (the composition root's: it needs the
    models' image reading); without it ``POST /api/exports`` answers 503. ``disc_proposer`` proposes the
    optic-disc crop of an uploaded photograph (the localiser of the models; without it the user draws it).
    ``checks`` are further readiness checks by name (the DICOM listener, the models: what api/ cannot see)."""
    # No Swagger UI (it loads scripts from a CDN and runs inline script); the schema is at /api/openapi.json.
    app = FastAPI(
        title="screening-gateway",
        version="0.1.0",
        description=NOTICE,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.session_factory = session_factory
    app.state.settings = settings
    app.state.exporter = exporter
    app.state.disc_proposer = disc_proposer
    app.state.storage = Storage(settings.storage_dir, reserve_bytes=settings.storage.reserve_bytes)
    app.state.readiness_checks = dict(checks or {})
    app.state.metrics = metrics_registry(session_factory, app.state.storage, settings)
    # STOW-RS parses and stores in threads of its own, so uploads never take the other routes' threads.
    app.state.stow_limiter = anyio.CapacityLimiter(settings.http.stow_threads)
    # A page on another site must not reach us through a DNS name it points at 127.0.0.1 (DNS rebinding).
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.http.trusted_hosts, www_redirect=False)
    security.install(app)  # outermost: cross-site refusals and security headers on every response

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default answer quotes the offending input: no byte a client sent comes back to it.
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, exc: OperationalError) -> Response:
        # the database is down or restarting (credentials cannot even be checked): a retryable 503, not a 500
        return JSONResponse({"detail": "database unavailable; try again shortly"}, status_code=503)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if security.wants_page(request) and exc.status_code in (403, 404):
            return page(request, "error.html", exc.status_code, status=exc.status_code, detail=exc.detail)
        return await http_exception_handler(request, exc)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(principal: Authenticated) -> dict[str, Any]:
        return app.openapi()

    @app.get("/healthz")
    def healthz(session: SessionDep) -> dict[str, str]:  # a plain def: runs in a thread, off the event loop
        session.execute(text("SELECT 1"))
        return {"status": "ok", "database": "ok"}

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(auth.router)
    app.include_router(admin.router)
    app.include_router(audit.router)
    app.include_router(review.router)
    app.include_router(decisions.router)
    app.include_router(studies.router)
    app.include_router(orthanc_webhook.router)
    app.include_router(dicomweb.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(exports.router)
    app.include_router(models.router)
    app.include_router(upload.router)
    app.include_router(report.router)
    app.include_router(study_admin.router)
    app.include_router(deliveries.router)
    return app
