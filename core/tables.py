"""ORM tables. The schema is created by Alembic (core/migrations), never by ``create_all`` in production."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on SQLite (which drops tzinfo) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


UID = String(64)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(128))
    #: Patient ID as the first instance gave it: what administrators search by (never logged).
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    #: receiving -> complete (a job was queued); back to receiving when more instances arrive.
    status: Mapped[str] = mapped_column(String(16), default="receiving")
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: When the association that last delivered instances of this study was released.
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")

    __table_args__ = (
        Index("ix_study_status_last", "status", "last_received_at"),
        Index("ix_study_accession_number", "accession_number"),
    )


class StudyDeletion(Base):
    """The study a transaction is deleting, named here first: the append-only triggers let that study's
    review rows go (core.archive); removed again before the transaction commits."""

    __tablename__ = "study_deletion"

    study_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(128))
    manufacturer: Mapped[str | None] = mapped_column(String(64))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    #: Relative to the storage root.
    path: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16), default="dimse")  # dimse | orthanc | upload | stow
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """Durable queue entry; see core.jobs for the state machine."""

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    #: Lower runs first among due jobs (deliveries before new studies: a finished result waits for nobody).
    priority: Mapped[int] = mapped_column(Integer, default=100)
    #: pending -> running -> done | failed (attempts exhausted or permanent error)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Jobs with the same kind and key are not queued twice while one is pending or running.
    dedupe_key: Mapped[str | None] = mapped_column(String(128), index=True)
    study_id: Mapped[int | None] = mapped_column(ForeignKey("study.id", ondelete="SET NULL"), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=8)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    locked_by: Mapped[str | None] = mapped_column(String(64))
    #: How often the job was taken over after its worker stopped renewing the lease (died, was killed):
    #: a job that keeps killing its worker is quarantined (failed) after a bounded number of takeovers.
    takeovers: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_job_claim", "status", "priority", "next_attempt_at"),)


class WorkerHeartbeat(Base):
    """One row per live worker, refreshed while it runs: what ``/readyz`` reads to say workers are alive."""

    __tablename__ = "worker_heartbeat"

    worker_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    beat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    current_job_id: Mapped[int | None] = mapped_column(Integer)


class RoutingDecision(Base):
    """Why a series went to a model, or why it was skipped."""

    __tablename__ = "routing_decision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str | None] = mapped_column(String(32))
    routed: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(String(255))


class Report(Base):
    """A Structured Report we wrote: one per (study, model, model version, input set)."""

    __tablename__ = "report"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id", ondelete="SET NULL"))
    model_name: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[str] = mapped_column(String(32))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    input_hash: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))
    verification: Mapped[str] = mapped_column(String(16), default="UNVERIFIED")
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("report.id", ondelete="SET NULL"))
    #: For a VERIFIED report: the review (decision version) it records.
    review_id: Mapped[int | None] = mapped_column(ForeignKey("review.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    predictions: Mapped[list[Prediction]] = relationship(back_populates="report")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="report")


class Prediction(Base):
    __tablename__ = "prediction"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"), index=True)
    report_id: Mapped[int | None] = mapped_column(ForeignKey("report.id", ondelete="SET NULL"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id", ondelete="SET NULL"))
    model_name: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[str] = mapped_column(String(32))
    #: Finding name (glaucoma, pneumonia, ...); None for a not-assessable image.
    finding: Mapped[str | None] = mapped_column(String(32))
    probability: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    label: Mapped[str | None] = mapped_column(String(16))  # present | absent
    assessable: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Made by a version in shadow mode: stored to compare, never reported, sent or shown as the result.
    shadow: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    report: Mapped[Report | None] = relationship(back_populates="predictions")


class Delivery(Base):
    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("report.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    #: pending -> sent | dead (rejected by the peer: no retry) | failed (retries exhausted)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    report: Mapped[Report] = relationship(back_populates="deliveries")

    __table_args__ = (
        UniqueConstraint("report_id", "destination"),
        # a destination's deliveries waiting out a backoff (gateway.delivery: after every success, and while
        # it fails); without it each delivery scanned every delivery ever made, holding the write lock
        Index("ix_delivery_waiting", "status", "destination", "next_attempt_at"),
    )


class AuditEvent(Base):
    """Append-only (database triggers refuse UPDATE and DELETE): who did what, when, from where. Written in
    the transaction of what it records (core.audit.record)."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    #: "user:alice", "token:alice", "dimse:MODALITY_AE", "worker:host-123", "cli", "anonymous"
    actor: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: The client's address for requests over HTTP (None for DIMSE, workers, the command line).
    client: Mapped[str | None] = mapped_column(String(64))


class User(Base):
    """A person (or a script's owner) who signs in: radiologist, data or admin."""

    __tablename__ = "user_account"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    full_name: Mapped[str | None] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))  # radiologist | data | admin
    #: Argon2id (PHC string); never the password.
    password_hash: Mapped[str] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    password_changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiToken(Base):
    """A bearer token for scripts: ``sgw_<prefix>_<secret>``; only the prefix and a SHA-256 of the whole
    token are stored."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    token_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str | None] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    user: Mapped[User] = relationship()


class WebSession(Base):
    """A signed-in browser: the cookie holds a random token, the table its SHA-256 (a stolen database
    does not sign anyone in)."""

    __tablename__ = "web_session"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user_account.id", ondelete="CASCADE"), index=True)
    #: Sent back with every state-changing request of this session (form field or X-CSRF-Token header).
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    client: Mapped[str | None] = mapped_column(String(64))

    user: Mapped[User] = relationship()


class LoginAttempt(Base):
    """Every sign-in attempt, for throttling per user name and per client address."""

    __tablename__ = "login_attempt"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    client: Mapped[str | None] = mapped_column(String(64), index=True)
    success: Mapped[bool] = mapped_column(Boolean)


class ReviewCase(Base):
    """A study with AI results, as the worklist shows it: one row per study, refreshed whenever an AI report
    or a review of it is written (core.worklist.refresh_case). Filters read it and its findings."""

    __tablename__ = "review_case"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16), index=True)
    #: Study Date (DICOM DA, YYYYMMDD), or the day the study arrived when it has none.
    study_date: Mapped[str] = mapped_column(String(8), index=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    #: Some finding of a current AI report is present.
    ai_positive: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Smallest |probability - threshold| over the current findings (None: nothing assessable).
    margin: Mapped[float | None] = mapped_column(Float)
    #: Some image was assessable by some model.
    assessable: Mapped[bool] = mapped_column(Boolean, default=True)
    #: The combinations of model, finding and AI label of its findings, as ",<id>,<id>," of their review_tag
    #: rows (core.worklist.case_tokens): a filter naming one is one short substring test on this row.
    tags: Mapped[str] = mapped_column(Text, default=",")
    #: unreviewed | reviewed (every current AI report has a review) | flagged (for a second reader)
    status: Mapped[str] = mapped_column(String(16), default="unreviewed")
    claimed_by_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="SET NULL"))
    claim_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    claimed_by: Mapped[User | None] = relationship()

    __table_args__ = (Index("ix_review_case_order", "status", "received_at", "id"),)


class ReviewTag(Base):
    """A token of the worklist's tags ("m=pneumonia|f=covid19|l=present") and the number cases store for it:
    numbers keep ``review_case.tags`` about 5 times shorter than the tokens, and the facet counts, which
    test every case for each filter value, as much faster."""

    __tablename__ = "review_tag"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[str] = mapped_column(String(255), unique=True)


class ReviewFinding(Base):
    """One finding (or a not-assessable image) of a study's current AI reports: what the worklist filters
    on."""

    __tablename__ = "review_finding"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("review_case.id", ondelete="CASCADE"), index=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("prediction.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(32))
    finding: Mapped[str | None] = mapped_column(String(32))
    label: Mapped[str | None] = mapped_column(String(16))  # present | absent | None (not assessable)
    #: |probability - threshold|; None when not assessable.
    margin: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index("ix_review_finding_model", "model_name", "finding", "label", "case_id"),
        Index("ix_review_finding_finding", "finding", "label", "case_id"),
    )


class Review(Base):
    """One saved decision (a version) of one reviewer on one AI report: append-only (database triggers refuse
    UPDATE and DELETE); a revision is a new row with the next version. The worker turns each into a
    verified SR (Report.review_id)."""

    __tablename__ = "review"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    #: The AI report reviewed.
    report_id: Mapped[int] = mapped_column(ForeignKey("report.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(32))
    model_version: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("user_account.id", ondelete="SET NULL"))
    #: The reviewer as the verified SR names them (user name and full name at the time of the decision).
    username: Mapped[str] = mapped_column(String(64))
    full_name: Mapped[str | None] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Per image: {"sop_instance_uid", "ai_label", "label", "action", "reason"} (see core.labels).
    answers: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    comment: Mapped[str | None] = mapped_column(Text)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Glaucoma: age, sex, laterality, intraocular pressure, cup-to-disc ratio, known diagnosis.
    clinical: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    user: Mapped[User | None] = relationship()

    __table_args__ = (UniqueConstraint("report_id", "version"),)


class ModelVersion(Base):
    """One version of one model in the registry (core.model_versions): its weights' digest, where its bundle
    is, what it was trained on and measured at, and its status. One active version per model."""

    __tablename__ = "model_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32))
    version: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: SHA-256 of the served graph (model.tflite)
    digest: Mapped[str] = mapped_column(String(64))
    #: the bundle folder
    path: Mapped[str] = mapped_column(Text)
    #: shipped (in the package) | configured (GATEWAY_INFERENCE__MODEL_DIRS) | made (DATA_DIR/models)
    source: Mapped[str] = mapped_column(String(16))
    data_summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: candidate | shadow | active | retired
    status: Mapped[str] = mapped_column(String(16))
    changed_by: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        UniqueConstraint("name", "version"),
        Index(
            "uq_model_version_active",
            "name",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )


class OrthancCursor(Base):
    """The last Orthanc /changes sequence number the reconciler has handled (one row per Orthanc URL)."""

    __tablename__ = "orthanc_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    orthanc_url: Mapped[str] = mapped_column(String(255), unique=True)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
