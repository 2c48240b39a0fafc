"""The pixel budget: what decoding an instance will cost, known from its header before any codec runs.

Rows x Columns x Samples per Pixel x Number of Frames (x Bits Allocated / 8) from the Image Pixel module
must fit the limits. A codec allocates what its own codestream header declares, not what the DICOM header
says, so for encapsulated transfer syntaxes every frame's codestream header (JPEG SOF, JPEG-LS SOF55,
JPEG 2000 SIZ, the RLE header) must describe the same image. Checked at ingest (the instance is refused)
and again in the worker before decoding (the image is not assessable).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import DecodeRunner
from pydicom.uid import (
    UID,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLELossless,
)

from core.encoding import describe, printable
from core.settings import IngestSettings

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
#: Enough of a frame to hold any codestream's main header up to its SOF/SIZ.
_HEAD_BYTES = 64 << 10
#: JPEG start-of-frame markers (ITU T.81 B.1.1.3: C0-CF except DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55.
_SOF_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_SOC_SIZ = b"\xff\x4f\xff\x51"


class PixelDataError(ValueError):
    """Pixel data that must not be decoded: its description is incomplete or absurd, or beyond the budget."""


class PixelBudgetExceeded(PixelDataError):
    """Decoding would take more pixels or bytes than the limits allow."""


class CodestreamMismatch(PixelDataError):
    """A frame's codestream describes another image than the dataset's Image Pixel module."""


@dataclass(frozen=True)
class Geometry:
    rows: int
    columns: int
    samples: int
    frames: int
    bits_allocated: int

    @property
    def pixels(self) -> int:
        return self.rows * self.columns * self.samples * self.frames

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * max(1, self.bits_allocated // 8)  # 1-bit data is unpacked to a byte per pixel


def geometry(ds: Dataset) -> Geometry:
    """The decoded size the Image Pixel module declares; PixelDataError for missing or absurd values."""
    return Geometry(
        rows=_int(ds, "Rows", 1, 0xFFFF),
        columns=_int(ds, "Columns", 1, 0xFFFF),
        samples=_int(ds, "SamplesPerPixel", 1, 4),
        frames=_int(ds, "NumberOfFrames", 1, 2**31 - 1, default=1),
        bits_allocated=_int(ds, "BitsAllocated", 1, 64),
    )


def _int(ds: Dataset, keyword: str, low: int, high: int, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise PixelDataError(f"image without {keyword}")
        return default
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise PixelDataError(f"{keyword} is not a number: {str(value)[:32]!r}") from None
    if not low <= number <= high:
        raise PixelDataError(f"{keyword} {number} outside {low}..{high}")
    return number


def check_budget(shape: Geometry, limits: IngestSettings) -> None:
    if shape.pixels > limits.max_pixels:
        raise PixelBudgetExceeded(
            f"{shape.pixels} pixels exceed the limit of {limits.max_pixels} ({shape.rows} x {shape.columns}"
            f" x {shape.samples} samples x {shape.frames} frames)"
        )
    if shape.decoded_bytes > limits.max_decoded_bytes:
        raise PixelBudgetExceeded(
            f"{shape.decoded_bytes} decoded pixel bytes exceed the limit of {limits.max_decoded_bytes}"
        )


def check_decodable(ds: Dataset, transfer_syntax_uid: str, limits: IngestSettings) -> Geometry:
    """Raise PixelDataError unless decoding ``ds``'s pixel data is possible and within ``limits``.

    Checks the Image Pixel module as pydicom's decoder will (required attributes and values, native data long
    enough), the budget, and for encapsulated data each frame's codestream header against the module.
    Decodes nothing.
    """
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise PixelDataError("dataset has no pixel data")
    pixel_vr = ds["PixelData"].VR if "PixelData" in ds else None
    if pixel_vr not in (None, "OB", "OW", "OB or OW"):  # e.g. sent as UR: its value is text, not pixels
        raise PixelDataError(f"Pixel Data with VR {printable(str(pixel_vr))}, not OB or OW")
    shape = geometry(ds)
    check_budget(shape, limits)
    syntax = UID(transfer_syntax_uid)
    try:
        get_decoder(syntax)
        runner = DecodeRunner(syntax)
        runner.set_source(ds)
        runner.validate()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # pydicom: AttributeError, ValueError, NotImplementedError ...
        raise PixelDataError(f"image pixel module: {printable(str(exc)) or type(exc).__name__}") from None
    if syntax.is_encapsulated:
        _check_codestreams(ds, syntax, shape)
    return shape


def _check_codestreams(ds: Dataset, syntax: UID, shape: Geometry) -> None:
    count = 0
    for index, (head, size) in enumerate(_frame_heads(ds, shape.frames)):
        count += 1
        if syntax == RLELossless:
            _check_rle(head, size, shape, index)
            continue
        if syntax in JPEG2000TransferSyntaxes:
            rows, columns, components, precision = _siz(head, index)
        elif syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
            rows, columns, components, precision = _sof(head, index)
        else:
            raise PixelDataError(f"codestreams of {syntax.name} cannot be checked before decoding")
        if (rows, columns, components) != (shape.rows, shape.columns, shape.samples) or (
            precision > shape.bits_allocated
        ):
            raise CodestreamMismatch(
                f"frame {index + 1}: codestream declares {rows} x {columns} x {components} samples of "
                f"{precision} bits, the dataset {shape.rows} x {shape.columns} x {shape.samples} of "
                f"{shape.bits_allocated}"
            )
    if count < shape.frames:
        raise CodestreamMismatch(f"encapsulated pixel data holds {count} of {shape.frames} frames")


def _frame_heads(ds: Dataset, frames: int) -> Iterator[tuple[bytes, int]]:
    """(first bytes, total size) of each frame's codestream, frames as pydicom's decoder delimits them."""
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        for fragments in generate_fragmented_frames(
            ds.PixelData, number_of_frames=frames, extended_offsets=offsets
        ):
            head, size = bytearray(), 0
            for fragment in fragments:
                if len(head) < _HEAD_BYTES:
                    head += fragment[: _HEAD_BYTES - len(head)]
                size += len(fragment)
            yield bytes(head), size
    except (ValueError, KeyError, IndexError, struct.error) as exc:
        raise PixelDataError(f"encapsulated pixel data unreadable: {describe(exc)}") from None


def _sof(head: bytes, index: int) -> tuple[int, int, int, int]:
    """(rows, columns, components, precision) from a JPEG or JPEG-LS start-of-frame segment."""
    if head[:2] != b"\xff\xd8":
        raise CodestreamMismatch(f"frame {index + 1}: no JPEG start-of-image marker")
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            break
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            break
        if marker in _SOF_MARKERS and pos + 10 <= len(head):
            precision, rows, columns, components = struct.unpack_from(">BHHB", head, pos + 4)
            return rows, columns, components, precision
        pos += 2 + struct.unpack_from(">H", head, pos + 2)[0]
    raise CodestreamMismatch(f"frame {index + 1}: no JPEG frame header (SOF) found")


def _siz(head: bytes, index: int) -> tuple[int, int, int, int]:
    """(rows, columns, components, precision) from a JPEG 2000 SIZ segment (ISO 15444-1 A.5.1)."""
    start = 0 if head.startswith(_SOC_SIZ) else -1
    if start < 0 and head.startswith(_JP2_SIGNATURE):
        start = head.find(_SOC_SIZ)
    if start < 0 or start + 42 > len(head):
        raise CodestreamMismatch(f"frame {index + 1}: no JPEG 2000 image and tile size (SIZ) marker")
    fields = struct.unpack_from(">HHIIIIIIIIH", head, start + 4)
    xsiz, ysiz, x0, y0, components = fields[2], fields[3], fields[4], fields[5], fields[10]
    if xsiz <= x0 or ysiz <= y0 or not components or start + 42 + 3 * components > len(head):
        raise CodestreamMismatch(f"frame {index + 1}: JPEG 2000 SIZ marker is inconsistent")
    precision = max((head[start + 42 + 3 * c] & 0x7F) + 1 for c in range(components))
    return ysiz - y0, xsiz - x0, components, precision


def _check_rle(head: bytes, size: int, shape: Geometry, index: int) -> None:
    """The RLE header (PS3.5 G.5): one segment per sample and byte, offsets inside the frame."""
    if len(head) < 64:
        raise CodestreamMismatch(f"frame {index + 1}: RLE header truncated")
    segments, *offsets = struct.unpack_from("<16L", head)
    expected = shape.samples * max(1, shape.bits_allocated // 8)
    if segments != expected:
        raise CodestreamMismatch(f"frame {index + 1}: {segments} RLE segments, the dataset needs {expected}")
    used = offsets[:segments]
    if used[0] != 64 or any(b <= a for a, b in itertools.pairwise(used)) or used[-1] >= size:
        raise CodestreamMismatch(f"frame {index + 1}: RLE segment offsets are inconsistent")
