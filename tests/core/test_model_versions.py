"""The registry's rules (core.model_versions) on SQLite and PostgreSQL: configured bundles become active on
start, a person's promotion survives restarts, the same version with other weights is refused, every change
is audited."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.db import transaction
from core.model_versions import STARTUP, Bundle, RegistryError, active, add, set_status, sync_configured
from core.tables import AuditEvent


def _bundle(name: str, version: str, digest: str = "a", source: str = "shipped") -> Bundle:
    return Bundle(name, version, digest * 64, f"/bundles/{name}/{version}", source)


def _active(factory: sessionmaker[Session]) -> dict[str, str]:
    with factory() as session:
        return {name: row.version for name, row in active(session).items()}


def test_configuration_decides_until_a_person_promotes(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as session:  # first start: shipped, then a configured folder overriding one
        sync_configured(session, [_bundle("pneumonia", "1.0"), _bundle("pneumonia", "1.1-site", "b")])
        sync_configured(session, [_bundle("covid19", "2.0")])
    assert _active(factory) == {"pneumonia": "1.1-site", "covid19": "2.0"}
    with transaction(factory) as session:  # a restart with a new shipped version: it takes over
        sync_configured(session, [_bundle("covid19", "2.1", "c")])
    assert _active(factory)["covid19"] == "2.1"

    with transaction(factory) as session:
        add(session, _bundle("covid19", "3.0-retrained", "d", "made"), actor="alice")
        set_status(session, "covid19", "3.0-retrained", "active", actor="alice", reason="better")
    with transaction(factory) as session:  # restarts do not undo a person's promotion
        sync_configured(session, [_bundle("covid19", "2.1", "c"), _bundle("covid19", "2.2", "e")])
    assert _active(factory)["covid19"] == "3.0-retrained"
    with factory() as session:
        actions = [
            (e.actor, e.action, e.detail["version"])
            for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
            if e.detail.get("model") == "covid19" and e.actor != STARTUP
        ]
    assert actions == [
        ("alice", "model.register", "3.0-retrained"),
        ("alice", "model.retire", "2.1"),
        ("alice", "model.promote", "3.0-retrained"),
    ]


def test_refusals(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as session:
        sync_configured(session, [_bundle("glaucoma", "1.0")])
    with pytest.raises(RegistryError, match="other weights"), transaction(factory) as session:
        add(session, _bundle("glaucoma", "1.0", "f"), actor="bob")
    with pytest.raises(RegistryError, match="active version"), transaction(factory) as session:
        set_status(session, "glaucoma", "1.0", "retired", actor="bob")
    with pytest.raises(RegistryError, match="no version"), transaction(factory) as session:
        set_status(session, "glaucoma", "7", "active", actor="bob")
    with pytest.raises(RegistryError, match="status must be"), transaction(factory) as session:
        set_status(session, "glaucoma", "1.0", "deleted", actor="bob")
    assert _active(factory) == {"glaucoma": "1.0"}
