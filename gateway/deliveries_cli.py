"""`gateway deliveries` and `gateway jobs`: the dead letters (failed and dead deliveries, failed jobs) and
retrying them, as the admin page does (core.deadletter; audited with actor "cli")."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from core.settings import Settings
from gateway.cli_settings import command_settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

deliveries_app = typer.Typer(
    help="Deliveries of reports to destinations: the failed and dead ones, and sending them again.",
    no_args_is_help=True,
)
jobs_app = typer.Typer(help="The job queue: failed jobs, and running them again.", no_args_is_help=True)

_Limit = Annotated[int, typer.Option(min=1, help="At most this many, newest first.")]


@contextmanager
def _session() -> Iterator[tuple[Session, Settings]]:
    """One transaction on the configured database (schema brought to head first, as the other admin
    commands do); a refused retry exits 1 with its reason, bad settings exit 2."""
    from core.db import make_engine, make_sessionmaker, transaction
    from core.deadletter import DeadLetterError
    from core.migrate import upgrade

    settings = command_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.sqlalchemy_url)
    try:
        upgrade(engine)
        with transaction(make_sessionmaker(engine)) as session:
            yield session, settings
    except DeadLetterError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        engine.dispose()


def _checked(values: list[str] | None, allowed: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    """The --status values given (each one of ``allowed``), else ``default``."""
    for value in values or ():
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint="--status")
    return tuple(values) if values else default


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


@deliveries_app.command("list")
def deliveries_list(
    status: Annotated[
        list[str] | None,
        typer.Option(help="pending, sent, failed or dead (repeat; default: failed and dead)."),
    ] = None,
    limit: _Limit = 200,
) -> None:
    """Deliveries (default: failed and dead) with the PACS's last status and reason, newest first.

    One line each: id, state, destination, last status (0xA700), attempts, when it failed, study, report,
    model and the reason."""
    from core.deadletter import DEAD_LETTER, DELIVERY_STATUSES, list_deliveries

    statuses = _checked(status, DELIVERY_STATUSES, DEAD_LETTER)
    with _session() as (session, _):
        total, rows = list_deliveries(session, statuses=statuses, limit=limit)
        for d in rows:
            failed = d.failed_at.isoformat(timespec="seconds") if d.failed_at else "-"
            fields = [
                str(d.id),
                d.status,
                d.destination,
                d.last_status_hex or "-",
                f"attempts {d.attempts}",
                f"failed {failed}",
                d.study_instance_uid,
                d.report_sop_instance_uid,
                f"{d.model_name} {d.model_version}",
                _one_line(d.last_error),
            ]
            typer.echo("\t".join(fields))
    if not rows:
        typer.echo(f"no {' or '.join(statuses)} deliveries")
    elif total > len(rows):
        typer.echo(f"newest {len(rows)} of {total} shown", err=True)


@deliveries_app.command("retry")
def deliveries_retry(
    delivery_id: Annotated[
        int | None, typer.Argument(metavar="ID", help="The delivery to send again.")
    ] = None,
    all_failed: Annotated[
        bool, typer.Option("--all-failed", help="Every failed and dead delivery instead.")
    ] = False,
) -> None:
    """Send a failed or dead delivery again (its attempts from zero), or all of them; audited."""
    from core.deadletter import retry_delivery, retry_failed_deliveries

    if (delivery_id is None) == (not all_failed):
        typer.echo("give a delivery ID or --all-failed (not both)", err=True)
        raise typer.Exit(2)
    with _session() as (session, settings):
        attempts = settings.worker.delivery_max_attempts
        if delivery_id is not None:
            retry_delivery(session, delivery_id, actor="cli", max_attempts=attempts)
            ids = [delivery_id]
        else:
            ids = retry_failed_deliveries(session, actor="cli", max_attempts=attempts)
    if ids:
        typer.echo(f"{len(ids)} {'delivery' if len(ids) == 1 else 'deliveries'} queued again: {_ids(ids)}")
    else:
        typer.echo("no failed or dead delivery to retry")


@jobs_app.command("list")
def jobs_list(
    status: Annotated[
        list[str] | None, typer.Option(help="pending, running, done or failed (repeat; default: failed).")
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="Only jobs of this kind (deliver, process_study ...).")
    ] = None,
    limit: _Limit = 200,
) -> None:
    """Jobs (default: the failed ones) with their last error, newest first.

    One line each: id, kind, state, attempts, when it finished, study and the last error."""
    from core.deadletter import JOB_STATUSES, list_jobs

    statuses = _checked(status, JOB_STATUSES, ("failed",))
    with _session() as (session, _):
        total, rows = list_jobs(session, statuses=statuses, kind=kind, limit=limit)
        for j in rows:
            finished = j.finished_at.isoformat(timespec="seconds") if j.finished_at else "-"
            fields = [
                str(j.id),
                j.kind,
                j.status,
                f"attempts {j.attempts}/{j.max_attempts}",
                f"finished {finished}",
                j.study_instance_uid or "-",
                _one_line(j.last_error),
            ]
            typer.echo("\t".join(fields))
    if not rows:
        typer.echo(f"no {' or '.join(statuses)} jobs")
    elif total > len(rows):
        typer.echo(f"newest {len(rows)} of {total} shown", err=True)


@jobs_app.command("retry")
def jobs_retry(
    job_id: Annotated[int, typer.Argument(metavar="ID", help="The failed job to run again.")],
) -> None:
    """Run a failed job again through the queue (its attempts from zero); audited."""
    from core.deadletter import retry_job

    with _session() as (session, _):
        retry_job(session, job_id, actor="cli")
    typer.echo(f"job {job_id} queued again")


def _ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:20])
    return shown + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
