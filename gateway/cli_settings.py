"""The settings of a `gateway` command, read once with logging set up (shared by the command modules)."""

from __future__ import annotations

import logging
import sys

import typer

from core.settings import Settings, SettingsError, load_settings


def command_settings() -> Settings:
    """The settings, or exit 2 with what is wrong with them; logging to stderr at their level."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom's INFO lines describe every association; its DEBUG would dump datasets (patient data).
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    return settings
