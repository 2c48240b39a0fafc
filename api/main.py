"""The HTTP API application."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

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
    app.state.storage = Storage(settings.storage_dir)

    @app.get("/healthz")
    def healthz(session: SessionDep) -> dict[str, str]:
        session.execute(text("SELECT 1"))
        return {"status": "ok", "database": "ok"}

    app.include_router(studies.router)
    app.include_router(orthanc_webhook.router)
    app.include_router(dicomweb.router)
    app.include_router(health.router)
    return app
