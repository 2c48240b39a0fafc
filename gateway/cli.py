"""The `gateway` command."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from core.accounts import SCOPES
from core.settings import Settings, SettingsError
from gateway.cli_settings import command_settings
from gateway.deliveries_cli import deliveries_app, jobs_app

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from gateway.runtime import Runtime

app = typer.Typer(
    help="screening-gateway: AI screening in the PACS workflow (research decision support only).",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")
users_app = typer.Typer(help="People who sign in: radiologists, data teams, admins.", no_args_is_help=True)
app.add_typer(users_app, name="users")
tokens_app = typer.Typer(help="API tokens for scripts (bearer tokens, stored hashed).", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
worklist_app = typer.Typer(help="The radiologists' worklist.", no_args_is_help=True)
app.add_typer(worklist_app, name="worklist")
app.add_typer(deliveries_app, name="deliveries")
app.add_typer(jobs_app, name="jobs")

log = logging.getLogger("gateway")


def _disc_proposer() -> Callable[[Any], tuple[int, int, int]]:
    from gateway.models import propose_disc_crop

    return propose_disc_crop


def _runtime(
    settings: Settings, *, migrate: bool, ingests: bool = True, durable_commits: bool = True
) -> Runtime:
    """The process's runtime, or exit 1 saying why it cannot start (database down, schema out of date)."""
    from gateway.runtime import build_runtime

    try:
        return build_runtime(settings, migrate=migrate, ingests=ingests, durable_commits=durable_commits)
    except Exception as exc:
        typer.echo(f"cannot start: {exc}", err=True)
        raise typer.Exit(1) from None


@app.command()
def serve(
    migrate: Annotated[
        bool, typer.Option(help="Bring the database schema to the latest revision first.")
    ] = True,
) -> None:
    """Run the DICOM listener and the HTTP API, and supervise GATEWAY_WORKER__PROCESSES worker processes."""
    settings = command_settings()
    _share_metrics(settings.data_dir / "metrics")  # before anything imports prometheus-client
    import uvicorn

    from api.main import create_app
    from core.activity import clear_counters, count_ingest
    from core.heartbeat import remove_heartbeats
    from dicom_listener.receivers import ReceiverPool
    from dicom_listener.server import receive_into
    from dicom_listener.server import serve as serve_dicom
    from gateway.readiness import ModelCheck
    from gateway.supervisor import Supervisor, receiver_command, worker_command

    rt = _runtime(settings, migrate=migrate)
    receive_into(rt.storage)
    _register_models(rt)
    threading.Thread(target=_retag_worklist, args=(rt,), name="worklist-retag", daemon=True).start()
    threading.Thread(target=_index_studies, args=(rt,), name="studies-index", daemon=True).start()
    clear_counters(settings.ingest_rate_dir)  # those of a previous run's processes
    count_ingest(settings.ingest_rate_dir)
    _settle_for_receiving()
    pool = ReceiverPool() if settings.dicom.receiver_processes else None
    try:
        listener = serve_dicom(settings, rt.storage, rt.factory, pool)
    except SettingsError as exc:  # a TLS certificate or key that does not load
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(f"cannot listen on DICOM port {settings.dicom.port}: {exc}", err=True)
        raise typer.Exit(1) from None
    host = socket.gethostname()[:255]

    def forget_worker(pid: int) -> None:  # a killed worker could not remove its heartbeat row
        remove_heartbeats(rt.factory, host=host, pid=pid)

    workers = Supervisor(worker_command(os.getpid()), settings.worker.processes, on_exit=forget_worker)
    receivers = Supervisor(
        receiver_command(os.getpid()),
        settings.dicom.receiver_processes,
        channel=pool.channel if pool is not None else None,
        kind="receiver",
    )
    # uvicorn hands SIGTERM/SIGINT back to the handler it found once it has stopped; this one unwinds through
    # the finally below, so the workers are stopped in order instead of dying with serve.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_on_signal)
    receivers.start()
    workers.start()
    models = ModelCheck(rt.factory, settings)
    threading.Thread(target=models.warm, name="models-check", daemon=True).start()  # for the first probe
    checks: dict[str, Callable[[], str | None]] = {"listener": listener.check, "models": models}
    config = uvicorn.Config(
        create_app(
            rt.factory, settings, exporter=_exporter(rt), disc_proposer=_disc_proposer(), checks=checks
        ),
        host=settings.http.host,
        port=settings.http.port,
        log_level="warning",
    )
    log.info("HTTP API on http://%s:%d", settings.http.host, settings.http.port)
    try:
        uvicorn.Server(config).run()
    finally:
        listener.shutdown()
        receivers.stop()
        workers.stop()
        rt.close()


def _share_metrics(folder: Path) -> None:
    """Put prometheus-client in multiprocess mode for this process and the receivers and workers it starts
    (they inherit the variable): each writes its counters and histograms to files of its own in ``folder``,
    emptied now (a previous run's), which GET /metrics sums (core.metrics). The library picks the mode when
    it is first imported, so this must come first."""
    import shutil

    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess folder was set")
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        typer.echo(f"cannot start: metrics folder {folder}: {exc}", err=True)
        raise typer.Exit(1) from None
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


def _exporter(rt: Runtime) -> Callable[[Any, str, str], tuple[Path, dict[str, Any]]]:
    """What ``POST /api/exports`` calls: a ZIP of the selected decisions, in the storage's temp folder."""

    def export(selection: Any, fmt: str, images: str) -> tuple[Path, dict[str, Any]]:
        from gateway.export import ExportOptions, deidentifier, zip_export

        options = ExportOptions(filter=selection, format=fmt, images=images)  # type: ignore[arg-type]
        return zip_export(rt.factory, rt.storage, deidentifier(rt.settings), options)

    return export


def _register_models(rt: Runtime) -> None:
    """Put the configured bundles in the model registry (their winners active unless a person promoted
    another version)."""
    from core.db import transaction
    from core.model_versions import sync_configured
    from gateway.models import configured_bundles

    with transaction(rt.factory) as session:
        sync_configured(session, configured_bundles(rt.settings))


def _retag_worklist(rt: Runtime) -> None:
    """Tag the worklist cases for the configured uncertain band (cases of an earlier band, or from before
    the tags said it), a batch per transaction, in the background: until then the worklist looks at those
    cases' findings one by one, which is correct but slower."""
    from core.db import transaction
    from core.worklist import retag_cases

    band, total = rt.settings.review.uncertain_band, 0
    try:
        while True:
            with transaction(rt.factory) as session:
                done = retag_cases(session, band)
            if not done:
                break
            total += done
    except Exception:
        log.exception("worklist: tagging the cases for the uncertain band %s failed after %d", band, total)
        return
    if total:
        log.info("worklist: %d cases tagged for the uncertain band %s", total, band)


def _index_studies(rt: Runtime) -> None:
    """In the background at start: remove the files of deleted studies a crash left behind, and read the
    patient IDs of studies stored before the database kept them (what administrators search by)."""
    from core.archive import index_patient_ids, remove_trash

    try:
        if removed := remove_trash(rt.storage):
            log.warning("storage: removed the files of %d deleted studies left by a crash", removed)
        if indexed := index_patient_ids(rt.factory, rt.storage):
            log.info("studies: patient IDs of %d earlier studies read from their files", indexed)
    except Exception:
        log.exception("studies: indexing at start failed")


def _settle_for_receiving() -> None:
    """Cheaper C-STOREs in a long-lived receiving process: the ORM mappers are configured now instead of
    in the first association, and the objects of start-up are moved out of the cyclic garbage collector's
    reach (gc.freeze) with a higher first threshold, so the collector no longer walks them every few hundred
    allocations of a 7.5 MB instance's path (measured: ~4 ms less CPU per CR instance, bench/ingest_cr.py)."""
    import gc

    from sqlalchemy.orm import configure_mappers

    configure_mappers()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    log.info("%s: stopping", signal.Signals(signum).name)
    raise SystemExit(0)


@app.command(hidden=True)
def receiver(
    parent_pid: Annotated[int, typer.Option(help="The `gateway serve` process: exit when it is gone.")],
    control_fd: Annotated[int, typer.Option(help="The inherited channel to the listening process.")],
) -> None:
    """Run the DICOM associations `gateway serve` hands over (one of GATEWAY_DICOM__RECEIVER_PROCESSES)."""
    from core.activity import count_ingest
    from dicom_listener.receivers import run_receiver
    from dicom_listener.server import receive_into
    from dicom_listener.server import receiver as build_receiver
    from gateway.supervisor import die_with_parent

    settings = command_settings()
    die_with_parent(parent_pid)
    control = socket.socket(fileno=control_fd)
    rt = _runtime(settings, migrate=False, ingests=False)  # the temp files of its siblings are in flight
    receive_into(rt.storage)
    count_ingest(settings.ingest_rate_dir)
    _settle_for_receiving()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        server = build_receiver(settings, rt.storage, rt.factory)
        run_receiver(control, server, network_timeout=settings.dicom.network_timeout)
    except KeyboardInterrupt:
        pass
    finally:
        rt.close()


@app.command()
def worker(
    parent_pid: Annotated[
        int | None,
        typer.Option(hidden=True, help="Supervised by `gateway serve` (this pid): exit when it is gone."),
    ] = None,
) -> None:
    """Run one worker process (production: several, sharing the PostgreSQL job table)."""
    from gateway.supervisor import die_with_parent, limit_memory, limit_threads, lower_priority

    settings = command_settings()
    if parent_pid is not None:
        die_with_parent(parent_pid)
    limit_threads(settings.worker.compute_threads)  # before NumPy loads
    limit_memory(settings.worker.memory_limit_mb)
    lower_priority(settings.worker.nice)
    from core.jobs import COMPUTE_KINDS, LIGHT_KINDS
    from gateway.worker import Worker

    # serve's ingest temp files are not ours to remove; what a worker commits is derived (core.db.make_engine)
    rt = _runtime(settings, migrate=False, ingests=False, durable_commits=False)
    # With delivery lanes the main loop runs studies only: a report never waits behind a study, a study
    # never behind a slow PACS.
    main = Worker(rt, kinds=COMPUTE_KINDS if settings.worker.delivery_lanes else None)
    lanes = [
        Worker(rt, name=f"{main.id}:delivery{n}", kinds=LIGHT_KINDS, heartbeat=False)
        for n in range(1, settings.worker.delivery_lanes + 1)
    ]
    threads = [threading.Thread(target=w.run_forever, name=w.id, daemon=True) for w in lanes]

    def stop(*_: object) -> None:
        for w in (main, *lanes):
            w.stop.set()

    signal.signal(signal.SIGTERM, stop)
    for t in threads:
        t.start()
    try:
        main.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop()
        for t in threads:
            t.join(timeout=10)
        rt.close()


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply the Alembic migrations (SQLite or PostgreSQL)."""
    from core.db import make_engine
    from core.migrate import current_revision, upgrade

    settings = command_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.sqlalchemy_url)
    upgrade(engine, revision)
    typer.echo(f"database at revision {current_revision(engine)}")
    engine.dispose()


@contextmanager
def _accounts_session() -> Iterator[Session]:
    """One transaction on the configured database (its schema brought to head first, so that the first admin
    can be created before the first `gateway serve`); account errors exit 1 with their message."""
    from core.accounts import AccountError
    from core.db import make_engine, make_sessionmaker, transaction
    from core.migrate import upgrade

    settings = command_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        upgrade(engine)
        with transaction(make_sessionmaker(engine)) as session:
            yield session
    except AccountError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()


def _read_password(password_stdin: bool) -> str:
    """From stdin (one line) when asked or when stdin is not a terminal, else prompted twice."""
    if password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


_PasswordStdin = Annotated[bool, typer.Option("--password-stdin", help="Read the password from stdin.")]


@users_app.command("create")
def users_create(
    username: Annotated[str, typer.Argument(help="Sign-in name: a-z, 0-9, '.', '_', '-'.")],
    role: Annotated[str, typer.Option(help="radiologist, data or admin.")],
    full_name: Annotated[
        str | None, typer.Option(help="Shown in verified reports (Verifying Observer).")
    ] = None,
    password_stdin: _PasswordStdin = False,
) -> None:
    """Create a user. The first admin can only be made here."""
    from core.accounts import create_user

    password = _read_password(password_stdin)
    with _accounts_session() as session:
        create_user(
            session, username=username, role=role, password=password, full_name=full_name, actor="cli"
        )
    typer.echo(f"user {username} created ({role})")


@users_app.command("list")
def users_list() -> None:
    """Users, their roles and state."""
    from sqlalchemy import select

    from core.tables import User

    with _accounts_session() as session:
        for user in session.scalars(select(User).order_by(User.username)):
            state = "disabled" if user.disabled else "active"
            last = user.last_login_at.isoformat(timespec="seconds") if user.last_login_at else "never"
            typer.echo(f"{user.username}\t{user.role}\t{state}\tlast sign-in {last}")


@users_app.command("disable")
def users_disable(username: str) -> None:
    """Stop a user from signing in; their sessions end and their tokens stop working."""
    from core.accounts import require_user, set_disabled

    with _accounts_session() as session:
        set_disabled(session, require_user(session, username), True, actor="cli")
    typer.echo(f"user {username} disabled")


@users_app.command("enable")
def users_enable(username: str) -> None:
    """Let a disabled user sign in again."""
    from core.accounts import require_user, set_disabled

    with _accounts_session() as session:
        set_disabled(session, require_user(session, username), False, actor="cli")
    typer.echo(f"user {username} enabled")


@users_app.command("reset")
def users_reset(username: str, password_stdin: _PasswordStdin = False) -> None:
    """Set a new password; the user's browser sessions end."""
    from core.accounts import require_user, set_password

    password = _read_password(password_stdin)
    with _accounts_session() as session:
        set_password(session, require_user(session, username), password, actor="cli")
    typer.echo(f"password of {username} reset")


@tokens_app.command("create")
def tokens_create(
    user: Annotated[str, typer.Option(help="The user the token acts for.")],
    scope: Annotated[
        list[str] | None,
        typer.Option(
            help=f"{', '.join(sorted(SCOPES))} (repeat; default: all of the role's).",
        ),
    ] = None,
    days: Annotated[
        int | None, typer.Option(help="Lifetime in days (0: none; default GATEWAY_AUTH__TOKEN_DAYS).")
    ] = None,
    name: Annotated[str | None, typer.Option(help="What the token is for.")] = None,
) -> None:
    """Create an API token and print it (only its hash is kept). Send it as `Authorization: Bearer ...`."""
    from core.accounts import create_token, require_user

    lifetime = command_settings().auth.token_days if days is None else days
    with _accounts_session() as session:
        row, token = create_token(
            session, require_user(session, user), scope or [], days=lifetime, name=name, actor="cli"
        )
        scopes = " ".join(row.scopes)
    typer.echo(token)
    typer.echo(f"scopes: {scopes}; expires: {row.expires_at.date() if row.expires_at else 'never'}", err=True)


@tokens_app.command("list")
def tokens_list() -> None:
    """Tokens by prefix: user, scopes, expiry, last use, revoked."""
    from sqlalchemy import select

    from core.tables import ApiToken

    with _accounts_session() as session:
        for t in session.scalars(select(ApiToken).order_by(ApiToken.id)):
            fields = [
                t.prefix,
                t.user.username,
                ",".join(t.scopes),
                f"expires {t.expires_at.isoformat(timespec='seconds') if t.expires_at else 'never'}",
                f"last used {t.last_used_at.isoformat(timespec='seconds') if t.last_used_at else 'never'}",
                "revoked" if t.revoked_at else "active",
                t.name or "",
            ]
            typer.echo("\t".join(fields))


@tokens_app.command("revoke")
def tokens_revoke(
    prefix: Annotated[str, typer.Argument(help="The token's prefix (see `tokens list`).")],
) -> None:
    """Revoke a token at once."""
    from core.accounts import revoke_token

    with _accounts_session() as session:
        revoke_token(session, prefix, actor="cli")
    typer.echo(f"token {prefix} revoked")


@worklist_app.command("rebuild")
def worklist_rebuild() -> None:
    """Rebuild every study's worklist case from its AI reports and reviews, and queue the drawing of its
    images (studies processed before the worklist existed; idempotent)."""
    from sqlalchemy import select

    from core.jobs import RENDER_STUDY, enqueue
    from core.tables import Report, Study
    from core.worklist import refresh_case

    settings = command_settings()
    with _accounts_session() as session:
        rows = session.execute(
            select(Study.id, Study.study_instance_uid)
            .where(Study.id.in_(select(Report.study_id)))
            .order_by(Study.id)
        ).all()
        cases = 0
        for study_id, uid in rows:
            review = settings.review
            band, share = review.uncertain_band, review.negative_sample_share
            if refresh_case(session, study_id, band=band, sample_share=share) is not None:
                cases += 1
                enqueue(
                    session,
                    kind=RENDER_STUDY,
                    priority=150,
                    payload={"study_instance_uid": uid},
                    study_id=study_id,
                    dedupe_key=f"render:{uid}",
                )
    typer.echo(f"{cases} cases on the worklist; their images are drawn by the workers")


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="DICOM, PNG or JPEG files or folders.", exists=True)],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model name (default: by image).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per file.")] = False,
) -> None:
    """Run a model on files and print its findings (research use only, not a diagnosis)."""
    from inference.predict import predict_paths
    from inference.registry import ModelRegistry

    settings = command_settings()
    registry = ModelRegistry(extra_dirs=settings.inference.model_dirs)
    if model is not None and model not in registry.names():
        typer.echo(f"unknown model {model!r}; installed: {', '.join(registry.names()) or 'none'}", err=True)
        raise typer.Exit(2)
    if not registry.names():
        typer.echo("no models installed (GATEWAY_INFERENCE__MODEL_DIRS)", err=True)
        raise typer.Exit(2)
    for row in predict_paths(paths, registry, model, choose=None if model else _route_by_header(settings)):
        if as_json:
            typer.echo(json.dumps(row))
            continue
        head = f"{row['file']}: {row.get('model')} {row.get('version')}"
        if not row.get("assessable"):
            typer.echo(f"{head}: {row.get('reason')}")
            continue
        found = ", ".join(
            f"{f['finding']} {f['label']} (p={f['probability']:.3f}, thr {f['threshold']:.2f})"
            for f in row["findings"]
        )
        typer.echo(f"{head}: {found}")


models_app = typer.Typer(help="The model registry: versions, status, promotion.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@contextmanager
def _models_session() -> Iterator[Session]:
    """:func:`_accounts_session` with the configured bundles registered first, as `gateway serve` registers
    them: a promotion on a data folder no `serve` has run on yet is still measured against the version
    `serve` would make active (the shipped one), not let through as the first version."""
    from core.model_versions import sync_configured
    from gateway.models import configured_bundles

    with _accounts_session() as session:
        sync_configured(session, configured_bundles(command_settings()))
        yield session


@models_app.command("list")
def models_list(name: Annotated[str | None, typer.Argument(help="Only this model.")] = None) -> None:
    """Every registered version: status, where its bundle is from, digest, who changed it last."""
    from core.model_versions import versions

    with _models_session() as session:
        rows = versions(session, name)
        for r in rows:
            typer.echo(
                f"{r.name:10} {r.version:16} {r.status:9} {r.source:10} {r.digest[:12]}  "
                f"{r.changed_at:%Y-%m-%d %H:%M} {r.changed_by}"
            )
        if not rows:
            typer.echo("no model registered yet (`gateway serve` registers the configured bundles)")


@models_app.command("show")
def models_show(name: str, version: str) -> None:
    """One version as JSON: bundle path, digest, data summary, validation metrics, status history."""
    from sqlalchemy import select

    from core.model_versions import find
    from core.tables import AuditEvent

    with _models_session() as session:
        row = find(session, name, version)
        if row is None:
            typer.echo(f"no version {version} of model {name}", err=True)
            raise typer.Exit(1)
        history = [
            {"at": e.at.isoformat(), "actor": e.actor, "action": e.action, **e.detail}
            for e in session.scalars(select(AuditEvent).where(AuditEvent.action.like("model.%")))
            if e.detail.get("model") == name and e.detail.get("version") == version
        ]
        out = {
            "name": row.name,
            "version": row.version,
            "status": row.status,
            "source": row.source,
            "path": row.path,
            "digest": row.digest,
            "created_at": row.created_at.isoformat(),
            "data_summary": row.data_summary,
            "metrics": row.metrics,
            "history": history,
        }
        typer.echo(json.dumps(out, indent=2))


@models_app.command("add")
def models_add(
    bundle: Annotated[
        Path, typer.Argument(help="A bundle folder (model.json, model.tflite ...).", exists=True)
    ],
) -> None:
    """Copy a bundle to DATA_DIR/models/NAME/VERSION and register it as a candidate."""
    from core.model_versions import RegistryError, add
    from gateway.models import install_bundle
    from inference.bundle import BundleError

    settings = command_settings()
    try:
        found = install_bundle(settings, bundle)
        with _models_session() as session:
            row = add(session, found, actor="cli")
            typer.echo(f"{row.name} {row.version}: {row.status} ({row.path})")
    except (BundleError, RegistryError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


@models_app.command("promote")
def models_promote(
    name: str,
    version: str,
    force: Annotated[bool, typer.Option("--force", help="Skip the gate (needs --reason).")] = False,
    reason: Annotated[str | None, typer.Option(help="Why (recorded in the audit trail).")] = None,
) -> None:
    """Make a version the active one, if it beats the active version on the model's fixed evaluation set
    (GATEWAY_INFERENCE__EVALUATION_SETS); the workers use it from their next study, without a restart."""
    from core.audit import record
    from core.model_versions import RegistryError, active, find, set_status

    settings = command_settings()
    if force and not (reason or "").strip():
        typer.echo("--force needs --reason", err=True)
        raise typer.Exit(2)
    evaluation = settings.inference.evaluation_sets.get(name)
    if not force and evaluation is None:
        typer.echo(
            f"no evaluation set for {name} (GATEWAY_INFERENCE__EVALUATION_SETS): the promotion gate cannot "
            "run; configure one, or promote with --force --reason TEXT",
            err=True,
        )
        raise typer.Exit(2)
    with _models_session() as session:
        candidate, current = find(session, name, version), active(session).get(name)
        if candidate is None:
            typer.echo(f"no version {version} of model {name}", err=True)
            raise typer.Exit(1)
        paths = (current.path if current else None, candidate.path)
        trained_on = {
            image_id
            for row in (current, candidate)
            if row is not None
            for image_id in (row.data_summary or {}).get("exported_image_ids", [])
        }
    figures = None
    if not force and paths[0] is not None:
        from gateway.export import deidentifier, reviewed_evaluation
        from training.promotion import describe, evaluate_pair

        assert evaluation is not None
        rt = _runtime(settings, migrate=False, ingests=False)
        try:
            reviewed = reviewed_evaluation(rt.factory, rt.storage, deidentifier(settings), name, trained_on)
        finally:
            rt.close()
        result = evaluate_pair(
            name,
            Path(paths[0]),
            Path(paths[1]),
            evaluation,
            margin=settings.inference.sensitivity_margin,
            reviewed=reviewed.rows,
            left_out={"trained on": reviewed.trained_on, "missing files": reviewed.missing},
        )
        typer.echo(describe(result))
        figures = result.figures
        if not result.passed:
            with _models_session() as session:
                record(
                    session,
                    actor="cli",
                    action="model.promote_refused",
                    detail={"version": version, **figures, "reasons": result.reasons},
                )
            raise typer.Exit(1)
    try:
        with _models_session() as session:
            row = set_status(
                session,
                name,
                version,
                "active",
                actor="cli",
                reason=f"forced: {reason}" if force else "passed the promotion gate",
            )
            if figures is not None:
                # the gate's figures on the evaluation set are the drift reference unless one was set
                reference = (row.metrics or {}).get("reference") or figures["candidate"]["reference"]
                row.metrics = {**(row.metrics or {}), "gate": figures, "reference": reference}
    except RegistryError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{name} {version} is active")


@models_app.command("reference")
def models_reference(
    name: str,
    version: str,
    data: Annotated[
        Path, typer.Option(help="Labels CSV, or a folder holding labels.csv (e.g. the validation split).")
    ],
) -> None:
    """Measure a version on labelled data (not-assessable share, mean probability per finding) and keep the
    figures as the reference its live figures are compared with for drift warnings (performance page). A
    promotion through the gate sets them from the evaluation set when none were set."""
    from core.audit import record
    from core.model_versions import find
    from training.promotion import reference_on

    with _models_session() as session:
        row = find(session, name, version)
        if row is None:
            typer.echo(f"no version {version} of model {name}", err=True)
            raise typer.Exit(1)
        path = Path(row.path)
    reference = reference_on(path, data)
    with _models_session() as session:
        row = find(session, name, version)
        assert row is not None
        row.metrics = {**(row.metrics or {}), "reference": reference}
        record(
            session,
            actor="cli",
            action="model.reference",
            detail={"model": name, "version": version, **reference},
        )
    typer.echo(json.dumps(reference, indent=2))


@models_app.command("shadow")
def models_shadow(name: str, version: str) -> None:
    """Run a version beside the active one on live studies: its predictions are stored with its version,
    never reported, sent or shown (`shadow_predictions` in GET /api/studies/{uid}); retire it to stop."""
    from core.model_versions import RegistryError, set_status

    try:
        with _models_session() as session:
            set_status(session, name, version, "shadow", actor="cli")
    except RegistryError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{name} {version} runs in shadow mode")


@models_app.command("retire")
def models_retire(name: str, version: str, reason: Annotated[str | None, typer.Option()] = None) -> None:
    """Retire a version that is not the active one."""
    from core.model_versions import RegistryError, set_status

    try:
        with _models_session() as session:
            set_status(session, name, version, "retired", actor="cli", reason=reason)
    except RegistryError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{name} {version} is retired")


@app.command("export")
def export_labels(
    out: Annotated[Path | None, typer.Option(help="Export folder (new or empty) or .zip file.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model's decisions.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Decided at or after (UTC).")] = None,
    until: Annotated[datetime | None, typer.Option(help="Decided before (UTC).")] = None,
    label: Annotated[
        str | None, typer.Option(help="Only this final label (covid19, no_glaucoma...).")
    ] = None,
    decision: Annotated[
        str, typer.Option(help="confirmed (AI label kept), corrected, or any (not assessable too).")
    ] = "confirmed",
    fmt: Annotated[str, typer.Option("--format", help="Manifest: csv or jsonl.")] = "csv",
    images: Annotated[str, typer.Option(help="png (for `gateway train`), dicom or none.")] = "png",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count; write nothing.")] = False,
    verify: Annotated[
        Path | None, typer.Option(help="Check an export (folder or .zip) instead.", exists=True)
    ] = None,
) -> None:
    """Export radiologists' decisions, de-identified (PS3.15 Annex E), for data teams and retraining."""
    from core.audit import record
    from core.export import DECISIONS, ExportFilter
    from gateway.export import (
        ExportOptions,
        FolderSink,
        ZipSink,
        count_export,
        deidentifier,
        verify_export,
        write_export,
    )

    settings = command_settings()
    rt = _runtime(settings, migrate=False, ingests=False)
    try:
        deid = deidentifier(settings)
        if verify is not None:
            problems = verify_export(rt.factory, rt.storage, deid, verify)
            for problem in problems:
                typer.echo(problem)
            typer.echo(f"{len(problems)} problems in {verify}")
            raise typer.Exit(1 if problems else 0)
        if decision not in DECISIONS or fmt not in ("csv", "jsonl") or images not in ("png", "dicom", "none"):
            typer.echo(
                "--decision: confirmed|corrected|any; --format: csv|jsonl; --images: png|dicom|none", err=True
            )
            raise typer.Exit(2)
        selection = ExportFilter(
            model=model,
            since=since.replace(tzinfo=UTC) if since else None,
            until=until.replace(tzinfo=UTC) if until else None,
            label=label,
            decision=decision,
        )
        if dry_run:
            counted = count_export(rt.factory, selection)
            for key, n in sorted(counted.items()):
                typer.echo(f"{key}: {n}")
            typer.echo(f"{sum(counted.values())} images would be exported")
            return
        if out is None:
            typer.echo("--out is required", err=True)
            raise typer.Exit(2)
        options = ExportOptions(filter=selection, format=fmt, images=images)  # type: ignore[arg-type]
        with typer.progressbar(length=1, label="exporting") as bar:

            def progress(done: int, total: int) -> None:
                bar.length = total
                bar.update(1)

            try:
                if out.suffix.lower() == ".zip":
                    if out.exists():
                        typer.echo(f"{out} exists", err=True)
                        raise typer.Exit(2)
                    with open(out, "xb") as fh:
                        sink = ZipSink(fh)
                        counts = write_export(rt.factory, rt.storage, deid, options, sink, progress=progress)
                        sink.close()
                else:
                    counts = write_export(
                        rt.factory, rt.storage, deid, options, FolderSink(out), progress=progress
                    )
            except ValueError as exc:  # a folder that is not empty
                typer.echo(str(exc), err=True)
                raise typer.Exit(2) from None
        with rt.factory.begin() as session:
            record(session, actor="cli", action="export.create", detail={"via": "cli", **counts.as_dict()})
        for key, n in sorted(counts.by_label.items()):
            typer.echo(f"{key}: {n}")
        typer.echo(
            f"{counts.rows} rows, {counts.images} images to {out}; left out: "
            f"{counts.burned_in} with burned-in annotation, {counts.unreadable} unreadable"
        )
    finally:
        rt.close()


@app.command("train")
def train_model(
    name: Annotated[str, typer.Argument(metavar="MODEL", help="Model name (pneumonia, covid19, ...).")],
    data: Annotated[Path, typer.Option(help="Data folder (with labels.csv) or labels CSV.", exists=True)],
    from_export: Annotated[
        list[Path] | None,
        typer.Option(
            "--from-export",
            exists=True,
            help="An export (folder or ZIP of `gateway export`) whose confirmed and corrected labels of "
            "MODEL are added to the base data; repeatable. The result is registered as a candidate version.",
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default: the recipe's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: the shipped model's).")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Bundle folder, card included (default: inference/weights/MODEL)."),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(help="Version of a retrained candidate (default: the shipped release + -r<UTC time>)."),
    ] = None,
    processing: Annotated[
        bool,
        typer.Option(
            "--processing",
            help="Chest models: also train on radiographs varied as other consoles process them (gamma, "
            "CLAHE, blur, noise); more robust to such processing, slightly lower on unprocessed images "
            "(inference/weights/pneumonia/design.md).",
        ),
    ] = False,
) -> None:
    """Train a model from labelled images: writes its bundle and model card (seeded, reproducible). With
    --from-export, retrain on the base data plus radiologists' labels: the bundle goes to
    DATA_DIR/models/MODEL/VERSION and is registered as a candidate for `gateway models promote`."""
    from training.recipes import DEFAULT_SEED, TrainConfig, default_config, get_recipe

    settings = command_settings()
    try:
        recipe = get_recipe(name)
    except KeyError as exc:
        typer.echo(str(exc.args[0]), err=True)
        raise typer.Exit(2) from None
    options: dict[str, Any] = {"epochs": epochs, "seed": DEFAULT_SEED if seed is None else seed}
    if processing:
        if name not in ("pneumonia", "covid19"):
            typer.echo(f"--processing is for the chest models (pneumonia, covid19), not {name}", err=True)
            raise typer.Exit(2)
        options["extra"] = {"processing": True}
    if from_export:
        if out is not None:
            typer.echo(
                "--out and --from-export exclude each other: a retrained bundle goes to the registry",
                err=True,
            )
            raise typer.Exit(2)
        _retrain(settings, name, data, from_export, version, options)
        return
    config = (
        default_config(name, data, **options)
        if out is None
        else TrainConfig(data=data, out_dir=out, **options)
    )
    bundle = recipe.train(config)
    typer.echo(f"wrote {bundle} and {config.card_path}")


def _retrain(
    settings: Settings,
    name: str,
    base: Path,
    exports: list[Path],
    version: str | None,
    options: dict[str, Any],
) -> None:
    """`gateway train MODEL --from-export ...`: merge, train in DATA_DIR/training, install and register."""
    import dataclasses
    import shutil

    from core.model_versions import RegistryError, add
    from gateway.models import install_bundle
    from inference.bundle import BundleError
    from training.merge import MergeError, merge_training_data
    from training.recipes import WEIGHTS_DIR, TrainConfig, get_recipe

    shipped = WEIGHTS_DIR / name / "model.json"
    release = json.loads(shipped.read_text(encoding="utf-8")) if shipped.is_file() else {}
    stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    version = version or f"{release.get('version', '0.0.0')}-r{stamp}"
    if not version or len(version) > 32 or not all(c.isalnum() or c in ".-_" for c in version):
        typer.echo(f"invalid version {version!r}: letters, digits, '.', '-' and '_', at most 32", err=True)
        raise typer.Exit(2)
    work = settings.data_dir / "training" / f"{name}-{version}"
    if work.exists():
        typer.echo(
            f"{work} exists: {name} {version} was retrained before; choose another --version", err=True
        )
        raise typer.Exit(1)
    try:
        merged, summary = merge_training_data(name, base, exports, work)
    except (MergeError, ValueError, OSError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        typer.echo(f"cannot merge the training data: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(summary.describe())
    bundle_dir = work / "bundle"
    bundle_dir.mkdir()
    changes = (
        f"Retrained with the shipped recipe on {summary.base_rows} base images and {summary.exported} images "
        f"labelled by radiologists ({summary.corrected} of them corrections of the AI) from "
        f"{len(summary.exports)} export(s)."
    )
    changelog = [{"version": version, "changes": changes}, *release.get("changelog", [])]
    # recipes take version and changelog from a model.json already in the bundle folder (training.recipes)
    (bundle_dir / "model.json").write_text(json.dumps({"version": version, "changelog": changelog}))
    config = TrainConfig(data=merged, out_dir=bundle_dir, **options)
    get_recipe(name).train(config)
    command = " ".join(
        ["gateway train", name, "--data", str(base), *[f"--from-export {e}" for e in exports]]
        + [f"--seed {config.seed}", f"--version {version}"]
        + ([f"--epochs {config.epochs}"] if config.epochs else [])
    )
    with open(config.card_path, "a", encoding="utf-8") as card:
        card.write(f"\n## Retraining data\n\n{summary.describe()}.\n\nReproduce: `{command}`\n")
    meta = json.loads((bundle_dir / "model.json").read_text(encoding="utf-8"))
    training = meta.get("training", {})
    try:
        bundle = install_bundle(settings, bundle_dir)
        bundle = dataclasses.replace(
            bundle,
            data_summary={**summary.as_dict(), "command": command},
            metrics={
                "training": {k: training[k] for k in ("n_train", "n_val", "epochs_run") if k in training}
            },
        )
        with _accounts_session() as session:
            add(session, bundle, actor="cli")
    except (BundleError, RegistryError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"registered {name} {version} as a candidate ({bundle.path})")
    typer.echo(f"next: gateway models promote {name} {version}")


@app.command("evaluate")
def evaluate_model(
    name: Annotated[str, typer.Argument(metavar="MODEL", help="Installed model name.")],
    data: Annotated[Path, typer.Option(help="Labelled folder or CSV.", exists=True)],
) -> None:
    """Print a model's metrics (JSON, with 95 % CIs) on labelled images, through the serving path."""
    from inference.bundle import BundleModel
    from inference.registry import ModelRegistry
    from training.recipes import get_recipe

    settings = command_settings()
    model = ModelRegistry(extra_dirs=settings.inference.model_dirs).get(name)
    try:
        recipe = get_recipe(name)
    except KeyError as exc:
        typer.echo(str(exc.args[0]), err=True)
        raise typer.Exit(2) from None
    if not isinstance(model, BundleModel):
        typer.echo(f"model {name!r} is not installed", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps(recipe.evaluate(model.path, data), indent=2, default=str))


@app.command("export-tflite")
def export_tflite(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder (model.keras, model.json).", exists=True)],
) -> None:
    """Convert a bundle's model.keras to the served model.tflite again (outputs, gate embedding, heatmaps)."""
    from training.export import reexport

    command_settings()
    typer.echo(f"wrote {reexport(bundle)}")


def _route_by_header(settings: Settings) -> Callable[[Path, Any], Sequence[str] | str]:
    """DICOM files go where the routing rules send them; PNG/JPEG by colour (fundus) or gray (chest)."""
    import pydicom

    from inference.gates.rules import is_colour
    from inference.preprocess import is_dicom_file
    from inference.routing import SeriesInfo, route_series

    def choose(path: Path, image: Any) -> Sequence[str] | str:
        if is_dicom_file(path):
            routes = route_series(
                SeriesInfo.from_dataset(pydicom.dcmread(path, stop_before_pixels=True)), settings.routing
            )
            names = [r.model_name for r in routes if r.model_name]
            return names or routes[0].reason
        models = settings.routing.fundus_models if is_colour(image) else settings.routing.chest_models
        return list(models)

    return choose


def main() -> None:
    app()
