"""A multipart/related request body (RFC 2387) spooled part by part to temp files on the storage volume.

The body is never held in memory: python-multipart's streaming parser writes each part to its own temp file
as the bytes arrive, and every write checks the limits (body size, part count, part size, free space), so a
request is refused as soon as it exceeds one. Writes block (file I/O, parsing): call them in a worker thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from core.storage import Storage

log = logging.getLogger(__name__)


class BodyRefused(Exception):
    """The request is refused as a whole; ``status`` is its HTTP status and the message is safe to show."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SpoolLimits:
    max_body_bytes: int
    max_parts: int
    max_part_bytes: int


class PartSpool:
    """The ``application/dicom`` parts of one request, each in its own temp file, in the order received."""

    def __init__(self, content_type: str, storage: Storage, limits: SpoolLimits) -> None:
        media, options = parse_options_header(content_type)
        if media != b"multipart/related":
            raise BodyRefused(415, 'STOW-RS needs Content-Type: multipart/related; type="application/dicom"')
        boundary = options.get(b"boundary")
        if not boundary:
            raise BodyRefused(400, "multipart/related without a boundary parameter")
        self.parts: list[Path] = []
        self._storage = storage
        self._limits = limits
        self._file: BinaryIO | None = None
        self._body_bytes = self._part_bytes = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._field, self._value = bytearray(), bytearray()
        self._ended = False
        try:
            self._parser = MultipartParser(
                boundary,
                {
                    "on_part_begin": self._on_part_begin,
                    "on_header_field": lambda data, start, end: self._field.extend(data[start:end]),
                    "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                    "on_header_end": self._on_header_end,
                    "on_headers_finished": self._on_headers_finished,
                    "on_part_data": self._on_part_data,
                    "on_part_end": self._close_part,
                    "on_end": self._on_end,
                },
            )
        except FormParserError:
            raise BodyRefused(400, "multipart boundary too long") from None

    def write(self, chunk: bytes) -> None:
        """Parse the next bytes of the body; raises BodyRefused as soon as a limit is exceeded."""
        self._body_bytes += len(chunk)
        if self._body_bytes > self._limits.max_body_bytes:
            raise BodyRefused(413, f"request body exceeds {self._limits.max_body_bytes} bytes")
        if not self._storage.has_room(len(chunk)):
            raise BodyRefused(507, "storage volume at its free-space reserve; retry later")
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            # python-multipart's messages quote body bytes; the client gets none of them back
            raise BodyRefused(400, "malformed multipart/related body") from None

    def finish(self) -> list[Path]:
        """The parts' temp files, once the whole body was written; raises BodyRefused for a truncated body."""
        if not self._ended:
            raise BodyRefused(400, "multipart/related body ends before its closing boundary")
        if not self.parts:
            raise BodyRefused(400, "no application/dicom part in the request")
        return self.parts

    def discard(self) -> None:
        """Remove every temp file still here (the caller removes the ones it took over)."""
        self._close_part()
        for path in self.parts:
            path.unlink(missing_ok=True)
        self.parts.clear()

    def _on_part_begin(self) -> None:
        self._close_part()
        if len(self.parts) >= self._limits.max_parts:
            raise BodyRefused(413, f"more than {self._limits.max_parts} parts in one request")
        self._file, path = self._storage.open_temp()
        self.parts.append(path)
        self._part_bytes = 0
        self._headers.clear()

    def _on_header_end(self) -> None:
        self._headers.append((bytes(self._field).strip().lower(), bytes(self._value).strip()))
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        kinds = [v.split(b";")[0].strip().lower() for k, v in self._headers if k == b"content-type"]
        if kinds and kinds[0] != b"application/dicom":
            raise BodyRefused(415, "a part is not application/dicom (the only type STOW-RS stores here)")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._part_bytes += end - start
        if self._part_bytes > self._limits.max_part_bytes:
            raise BodyRefused(413, f"a part exceeds {self._limits.max_part_bytes} bytes")
        assert self._file is not None
        self._file.write(memoryview(data)[start:end])

    def _close_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _on_end(self) -> None:
        self._ended = True
