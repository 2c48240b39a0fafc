"""The HTTP API application."""

from __future__ import annotations

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.trustedhost import TrustedHostMiddleware

from api.deps import SessionDep
from api.routes import dicomweb, health, studies
from core.settings import Settings
from core.storage import Storage
from orthanc import webhook as orthanc_webhook

NOTICE = "Research decision support only; results are not a diagnosis."


def create_app(session_factory: sessionmaker[Session], settings: Settings) -> FastAPI:
    app = FastAPI(title="screening-gateway", version="0.1.0", description=NOTICE)
    app.state.session_factory = session_factory
    app.state.settings = settings
    app.state.storage = Storage(settings.storage_dir, reserve_bytes=settings.storage.reserve_bytes)
    # STOW-RS parses and stores in threads of its own, so uploads never take the other routes' threads.
    app.state.stow_limiter = anyio.CapacityLimiter(settings.http.stow_threads)
    # A page on another site must not reach us through a DNS name it points at 127.0.0.1 (DNS rebinding).
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.http.trusted_hosts, www_redirect=False)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default answer quotes the offending input: no byte a client sent comes back to it.
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.get("/healthz")
    def healthz(session: SessionDep) -> dict[str, str]:  # a plain def: runs in a thread, off the event loop
        session.execute(text("SELECT 1"))
        return {"status": "ok", "database": "ok"}

    app.include_router(studies.router)
    app.include_router(orthanc_webhook.router)
    app.include_router(dicomweb.router)
    app.include_router(health.router)
    return app
