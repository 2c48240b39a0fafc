"""The model registry: every version of every model this site has (shipped, configured or made here), its
status, and who changed it. Exactly one active version per model (a partial unique index); workers read the
active versions before each study, so a promotion takes effect without a restart.

Statuses: ``candidate`` (registered, not used), ``shadow`` (runs on live studies beside the active version,
its results never sent nor shown), ``active`` (its results are the reports), ``retired``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.audit import record
from core.tables import ModelVersion, utcnow

log = logging.getLogger(__name__)

STATUSES = ("candidate", "shadow", "active", "retired")
#: changed_by of what `gateway serve` registered from its configuration (not a person's decision)
STARTUP = "startup"


class RegistryError(ValueError):
    """A change the registry refuses (unknown version, a status it cannot go to)."""


@dataclass(frozen=True)
class Bundle:
    """A model bundle on disk, as the registry records it."""

    name: str
    version: str
    digest: str  # SHA-256 of its served graph
    path: str
    source: str  # shipped | configured | made
    data_summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def find(session: Session, name: str, version: str) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    ).first()


def versions(session: Session, name: str | None = None) -> list[ModelVersion]:
    query = select(ModelVersion).order_by(ModelVersion.name, ModelVersion.id)
    if name is not None:
        query = query.where(ModelVersion.name == name)
    return list(session.scalars(query))


def active(session: Session) -> dict[str, ModelVersion]:
    rows = session.scalars(select(ModelVersion).where(ModelVersion.status == "active"))
    return {row.name: row for row in rows}


def shadows(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).where(ModelVersion.status == "shadow")))


def add(session: Session, bundle: Bundle, *, actor: str, status: str = "candidate") -> ModelVersion:
    """Register ``bundle`` (RegistryError if its name and version are taken by other weights)."""
    existing = find(session, bundle.name, bundle.version)
    if existing is not None:
        if existing.digest != bundle.digest:
            raise RegistryError(
                f"{bundle.name} {bundle.version} is registered with other weights ({existing.digest[:12]}); "
                "give the new bundle a new version"
            )
        return existing
    row = ModelVersion(
        name=bundle.name,
        version=bundle.version,
        digest=bundle.digest,
        path=bundle.path,
        source=bundle.source,
        data_summary=bundle.data_summary,
        metrics=bundle.metrics,
        status="candidate",
        changed_by=actor,
        changed_at=utcnow(),
    )
    session.add(row)
    session.flush()
    record(session, actor=actor, action="model.register", detail=_detail(row))
    if status != "candidate":
        set_status(session, bundle.name, bundle.version, status, actor=actor)
    return row


def set_status(
    session: Session, name: str, version: str, status: str, *, actor: str, reason: str | None = None
) -> ModelVersion:
    """Move a version to ``status``; making one active retires the version that was (same transaction)."""
    if status not in STATUSES:
        raise RegistryError(f"status must be one of {', '.join(STATUSES)}")
    row = find(session, name, version)
    if row is None:
        raise RegistryError(f"no version {version} of model {name}")
    if row.status == status:
        return row
    if row.status == "active":
        raise RegistryError(f"{name} {version} is the active version: promote another one instead")
    before = row.status
    if status == "active":
        current = active(session).get(name)
        if current is not None:
            current.status = "retired"
            current.changed_by, current.changed_at = actor, utcnow()
            session.flush()  # the partial unique index allows one active row per model
            record(session, actor=actor, action="model.retire", detail=_detail(current, reason=reason))
    row.status = status
    row.changed_by, row.changed_at = actor, utcnow()
    session.flush()
    action = {"active": "model.promote", "shadow": "model.shadow", "retired": "model.retire"}.get(status)
    record(session, actor=actor, action=action or "model.status", detail=_detail(row, before, reason))
    return row


def sync_configured(session: Session, bundles: list[Bundle]) -> None:
    """Register the bundles `gateway serve` is configured with (shipped, then GATEWAY_INFERENCE__MODEL_DIRS,
    later ones winning per name, as the registry reads them). The winner of each name becomes active while
    the active version is one the configuration chose; a version a person promoted stays active."""
    winners: dict[str, Bundle] = {}
    for bundle in bundles:
        try:
            add(session, bundle, actor=STARTUP)
        except RegistryError as exc:
            log.error("model bundle %s not registered: %s", bundle.path, exc)
            continue
        winners[bundle.name] = bundle
    current = active(session)
    for name, bundle in winners.items():
        now = current.get(name)
        if now is None or (now.changed_by == STARTUP and now.version != bundle.version):
            set_status(session, name, bundle.version, "active", actor=STARTUP)


def _detail(row: ModelVersion, before: str | None = None, reason: str | None = None) -> dict[str, Any]:
    detail: dict[str, Any] = {"model": row.name, "version": row.version, "status": row.status}
    if before is not None:
        detail["from"] = before
    if reason:
        detail["reason"] = reason[:500]
    return detail
