"""Small file systems made by a test: a tmpfs of a given size, so a disk can really fill up."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(path: Path, size: int) -> Iterator[Path]:
    """A tmpfs of ``size`` bytes mounted at ``path`` for the block; needs root (or CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (uid {os.geteuid()}): {mount.stderr.strip() or 'mount failed'}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, capture_output=True)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(path: Path, leave: int) -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``path``'s file system (to a 4 KiB page)."""
    filler = path / "filler"
    size = free_bytes(path) - leave
    assert size > 0, f"only {free_bytes(path)} bytes free, wanted to leave {leave}"
    with open(filler, "wb") as fh:
        fh.truncate(0)
        fh.write(b"\0" * size)  # written, not sparse: tmpfs counts only pages that hold data
    return filler
