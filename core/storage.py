"""Instance and report files under one storage root (a local folder or a shared volume).

Every write is durable before it returns: temp file in the same file system, fsync, atomic rename, fsync
of the directory. File names are built only from UIDs that passed validation, and always stay under the root.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from pydicom.uid import RE_VALID_UID

log = logging.getLogger(__name__)

#: Every temp file in ``tmp/`` starts with this: prepare() removes them after a crash.
TMP_PREFIX = _TMP_PREFIX = ".incoming-"
_SUFFIX = re.compile(r"(\.[A-Za-z0-9_-]+(?:\.[0-9]+)*)+")


class InvalidUID(ValueError):
    """A UID that is not a valid DICOM UID (and so can never become part of a file name)."""


def check_uid(value: object, what: str) -> str:
    text = str(value or "").strip()
    if len(text) > 64 or not RE_VALID_UID.match(text):
        raise InvalidUID(f"invalid {what}: {text[:80]!r}")
    return text


class Storage:
    """``reserve_bytes``: free space on the volume that writes of instances leave untouched (see has_room)."""

    def __init__(self, root: Path, *, reserve_bytes: int = 0) -> None:
        self.root = root.resolve()
        self.tmp_dir = self.root / "tmp"
        self.reserve_bytes = reserve_bytes

    def prepare(self, *, remove_leftovers: bool = True) -> int:
        """Create the folders and remove temp files left by a crash; returns how many were removed.

        Only the process that ingests (``gateway serve``) may remove them: ``tmp/`` holds its files in flight,
        so a worker process (re)started meanwhile passes ``remove_leftovers=False``.
        """
        for sub in ("instances", "reports", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if not remove_leftovers:
            return 0
        removed = 0
        for leftover in self.tmp_dir.glob(_TMP_PREFIX + "*"):
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.warning("removed %d leftover temp files from %s", removed, self.tmp_dir)
        return removed

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Relative path of an instance file; raises InvalidUID for anything but valid UIDs."""
        parts = (
            check_uid(study_uid, "Study Instance UID"),
            check_uid(series_uid, "Series Instance UID"),
            check_uid(sop_uid, "SOP Instance UID") + ".dcm",
        )
        return "instances/" + "/".join(parts)

    def report_path(self, study_uid: str, sop_uid: str) -> str:
        return f"reports/{check_uid(study_uid, 'Study Instance UID')}/{check_uid(sop_uid, 'SOP UID')}.dcm"

    def rendition_path(self, study_uid: str, sop_uid: str, suffix: str) -> str:
        """Relative path of a file the case page shows for an instance (``suffix``: ".png", ".thumb.jpg",
        ".json", ".glaucoma-1.1.0.heatmap.png" ...)."""
        if not _SUFFIX.fullmatch(suffix):
            raise InvalidUID(f"invalid rendition suffix {suffix!r}")
        study = check_uid(study_uid, "Study Instance UID")
        return f"renditions/{study}/{check_uid(sop_uid, 'SOP Instance UID')}{suffix}"

    def heatmap_path(self, study_uid: str, sop_uid: str, model: str, version: str) -> str:
        """Relative path of a model's heatmap of an instance (one per model version)."""
        return self.rendition_path(study_uid, sop_uid, f".{model}-{version}.heatmap.png")

    def absolute(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidUID(f"path escapes the storage root: {relative!r}")
        return path

    def write_bytes(self, relative: str, data: bytes | memoryview, *, durable: bool = True) -> Path:
        """Write ``data`` to ``relative`` atomically, durably unless ``durable`` is False (derived files
        that are drawn again when missing: no fsync, which costs more than drawing them); returns the
        absolute path."""
        target = self.absolute(relative)
        return write_atomic(target, data, tmp_dir=self.tmp_dir, durable=durable)

    def adopt(self, relative: str, source: Path) -> Path:
        """Durably move the complete file ``source`` to ``relative`` (as :meth:`write_bytes` would write it):
        fsync, atomic rename, fsync of the folders. A ``source`` on another file system is copied instead
        (and left for its owner to remove). Returns the absolute path."""
        target = self.absolute(relative)
        with open(source, "rb") as fh:
            os.fsync(fh.fileno())
        created = _make_parents(target.parent)
        try:
            os.chmod(source, 0o644)  # temp files are made 0600; PACS tools and backups read these files
            os.replace(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            return write_atomic(target, source.read_bytes(), tmp_dir=self.tmp_dir)
        for folder in [target.parent, *[c.parent for c in created]]:
            _fsync_dir(folder)
        return target

    def exists(self, relative: str) -> bool:
        return self.absolute(relative).is_file()

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the storage volume."""
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize

    def has_room(self, size: int) -> bool:
        """Whether ``size`` more bytes keep the volume's free space at or above the reserve."""
        return self.free_bytes() - size >= self.reserve_bytes

    def open_temp(self) -> tuple[BinaryIO, Path]:
        """A new temp file in ``tmp/`` (removed by prepare() after a crash); the caller removes it."""
        fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.tmp_dir)
        return os.fdopen(fd, "w+b"), Path(name)


def write_atomic(
    target: Path, data: bytes | memoryview, *, tmp_dir: Path | None = None, durable: bool = True
) -> Path:
    """Write ``data`` to ``target`` so that readers see the old file or the whole new one, never a part.

    Temp file (in ``tmp_dir``, default the target's folder; same file system), fsync, atomic rename, fsync of
    the folder. Folders created on the way are fsynced into their parents too. ``durable=False`` leaves
    out the fsyncs: atomic for readers, but a power cut may lose the file.
    """
    created = _make_parents(target.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=tmp_dir or target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)  # mkstemp makes 0600; PACS tools and backups read these files
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if durable:
        for folder in [target.parent, *[c.parent for c in created]]:
            _fsync_dir(folder)
    return target


def _make_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_BLOCK = 4096  # O_DIRECT alignment of buffer address, file offset and length (covers every disk)
_CHUNK = 1 << 20
#: The first bytes of each file go through the page cache: the dataset's header, which the C-STORE handler
#: reads back at once (from disk, holding the interpreter lock, were they written directly).
_HEAD = 256 << 10
_chunks: list[mmap.mmap] = []
_chunks_lock = threading.Lock()


class DirectTempFile:
    """A write-only temp file whose bytes bypass the page cache (``O_DIRECT``), for instances as they arrive.

    Copying a 7.5 MB instance into the page cache cost the receivers more CPU than anything else they do
    (the kernel's ``copy_folio_from_iter_atomic``: 2–12 ms per instance on a quiet machine, ~20 ms under
    ingest load, against 0.5 ms written directly; ``bench/ingest_cr.py``). Bytes collect in a page-aligned
    1 MiB buffer (reused between files) and go to disk a whole buffer at a time, but for the first 256 KiB
    (the header the handler reads back: through the page cache); :meth:`finish` writes the tail (padded to the
    block size, then the file cut to its length) and closes the file: only then is it complete. Where the
    file system refuses ``O_DIRECT`` it is an ordinary buffered file.

    The interface is what pynetdicom asks of the ``NamedTemporaryFile`` it receives a C-STORE into:
    ``name``, ``write``, ``file.flush`` (a no-op here: nothing reads the file before :meth:`finish`).
    """

    #: files made in this process (what tests and metrics read to see the path is taken)
    made = 0

    def __init__(self, folder: Path | str | None = None, prefix: str = _TMP_PREFIX, suffix: str = "") -> None:
        fd, self.name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        DirectTempFile.made += 1
        self._plain: int | None = fd
        self._direct: int | None = None
        self._size = 0  # bytes written to us
        self._offset = 0  # where the buffer's bytes go in the file
        self._fill = 0
        self._buffer: mmap.mmap | None = None
        try:
            self._direct = os.open(self.name, os.O_WRONLY | getattr(os, "O_DIRECT", 0))
        except OSError:
            return  # no O_DIRECT here: plain writes
        with _chunks_lock:
            self._buffer = _chunks.pop() if _chunks else mmap.mmap(-1, _CHUNK)

    @property
    def file(self) -> DirectTempFile:
        return self

    def flush(self) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._plain is None:
            raise ValueError("write to a finished file")
        size = len(data)
        if self._buffer is None:
            _write_all(self._plain, memoryview(data), self._size)
            self._size += size
            return size
        self._size += size
        view, buffer = memoryview(data), self._buffer
        while view:
            take = min(len(view), _CHUNK - self._fill)
            buffer[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == _CHUNK:
                self._spill(_CHUNK)
        return size

    def _spill(self, count: int) -> None:
        """Write the buffer's first ``count`` bytes (a multiple of the block size) at their offset."""
        assert self._buffer is not None and self._plain is not None and self._direct is not None
        view = memoryview(self._buffer)[:count]
        head = max(0, min(count, _HEAD - self._offset))
        if head:
            _write_all(self._plain, view[:head], self._offset)
        if head < count:
            _write_all(self._direct, view[head:], self._offset + head)
        self._offset += count
        self._fill = 0

    def finish(self) -> None:
        """Write what is buffered and close: the file is complete (not yet durable: fsync is the caller's)."""
        if self._plain is None:
            return
        try:
            if self._buffer is not None and self._fill:
                if self._offset + self._fill <= _HEAD:  # a small file: no padding, nothing direct
                    _write_all(self._plain, memoryview(self._buffer)[: self._fill], self._offset)
                else:
                    padded = -(-self._fill // _BLOCK) * _BLOCK
                    self._buffer[self._fill : padded] = bytes(padded - self._fill)
                    self._spill(padded)
                    os.ftruncate(self._plain, self._size)
        finally:
            self.close()

    def close(self) -> None:
        """Close without writing what is buffered (an abandoned transfer); idempotent."""
        for fd in (self._plain, self._direct):
            if fd is not None:
                os.close(fd)
        self._plain = self._direct = None
        buffer, self._buffer = self._buffer, None
        if buffer is not None:
            with _chunks_lock:
                if len(_chunks) < 16:
                    _chunks.append(buffer)
                    return
            buffer.close()

    def __del__(self) -> None:
        self.close()


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
