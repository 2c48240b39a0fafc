"""Hostile DICOM inputs, built small in the test: deep nesting, decompression bombs, lying codestreams, broken
UIDs. Nothing here ever holds the large thing it describes (a 1 GiB bomb is 1 MB of deflate).

The two regression files found by probes live in ../shared/dicom/hostile (see its README).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
)

from tests import factories as f
from tests.peers import SHARED_DICOM

HOSTILE = SHARED_DICOM / "hostile"
RLE_PANIC = HOSTILE / "rle_panic_chest_0.dcm"
NEST_300 = HOSTILE / "nest300_defined_ProcCodeSeq.dcm"

PROCEDURE_CODE_SEQUENCE = 0x00081032

#: Each one of the UID grammar rules of PS3.5 9.1, broken.
BAD_UIDS = {
    "empty-component": "1.2..3",
    "leading-zero": "1.2.03",
    "too-long": "1.2." + "3" * 63,
    "non-digit": "1.2.3a",
    "trailing-dot": "1.2.3.",
    "leading-dot": ".1.2.3",
    "space-inside": "1.2 .3",
    "empty": "",
}


def encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """``ds`` as a C-STORE carries it: the dataset alone, no preamble, no file meta."""
    syntax = UID(transfer_syntax)
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
    write_dataset(buffer, ds)
    return buffer.getvalue()


def part10(
    body: bytes,
    *,
    sop_class: str,
    sop_instance: str,
    transfer_syntax: str = ExplicitVRLittleEndian,
    preamble: bytes = bytes(128),
) -> bytes:
    """A DICOM file around an already encoded dataset (``body``), with exactly the preamble given."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=bool(sop_instance))
    return preamble.ljust(128, b"\0")[:128] + b"DICM" + buffer.getvalue() + body


def write(path: Path, ds: Dataset, body: bytes, **kw: object) -> Path:
    """``body`` (the encoded ``ds``, mangled or not) as a DICOM file whose meta names ``ds``'s UIDs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        part10(body, sop_class=str(ds.SOPClassUID), sop_instance=str(ds.SOPInstanceUID), **kw)  # type: ignore[arg-type]
    )
    return path


def _element(tag: int, vr: bytes, value: bytes, *, undefined: bool = False) -> bytes:
    """One explicit VR little endian element header (+ value)."""
    group, element = tag >> 16, tag & 0xFFFF
    if vr in (b"SQ", b"OB", b"UN", b"UT"):
        length = 0xFFFFFFFF if undefined else len(value)
        return struct.pack("<HH2s2xL", group, element, vr, length) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _code_item_elements() -> bytes:
    return (
        _element(0x00080100, b"SH", b"P1")
        + _element(0x00080102, b"SH", b"99")
        + _element(0x00080104, b"LO", b"Nested ")
    )


def nested_sequence(depth: int, *, undefined_length: bool) -> bytes:
    """A Procedure Code Sequence nested ``depth`` levels deep (explicit VR LE), built without recursion.

    Defined lengths: every header comes before its content, so the lengths are computed inside out and the
    headers written outside in. Undefined lengths: headers, then all the delimiters at the end.
    """
    codes = _code_item_elements()
    if undefined_length:
        head = b""
        for _ in range(depth):
            head += _element(PROCEDURE_CODE_SEQUENCE, b"SQ", b"", undefined=True)
            head += struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF) + codes
        tail = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        return head + tail * depth
    sizes = []  # sizes[k]: encoded size of the sequence element at nesting level depth - k
    size = 0
    for _ in range(depth):
        item = 8 + len(codes) + size
        size = 12 + item
        sizes.append(size)
    parts = []
    for size in reversed(sizes):
        item_length = size - 12
        parts.append(struct.pack("<HH2s2xL", 0x0008, 0x1032, b"SQ", item_length))
        parts.append(struct.pack("<HHL", 0xFFFE, 0xE000, item_length - 8) + codes)
    return b"".join(parts)


def splice(ds: Dataset, tag: int, element: bytes) -> bytes:
    """``ds`` encoded (explicit VR LE) with a raw ``element`` of ``tag`` inserted in tag order."""
    low, high = Dataset(), Dataset()
    for elem in ds:
        (low if elem.tag < tag else high).add(elem)
    return encode(low) + element + encode(high)


def deflate_bomb(ds: Dataset, inflated: int) -> bytes:
    """``ds`` deflated (Deflated Explicit VR Little Endian), followed by Data Set Trailing Padding of
    ``inflated`` zero bytes: about 1 KB of deflate per MiB, built without ever holding the padding."""

    def segment(data: bytes) -> bytes:  # a full flush: byte-aligned blocks that stand alone when repeated
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return deflater.compress(data) + deflater.flush(zlib.Z_FULL_FLUSH)

    chunk = 1 << 20
    head = encode(ds) + struct.pack("<HH2s2xL", 0xFFFC, 0xFFFC, b"OB", inflated)
    body = segment(bytes(chunk)) * (inflated // chunk) + segment(bytes(inflated % chunk))
    return segment(head) + body + b"\x03\x00"  # an empty final block ends the stream


def deflated(ds: Dataset) -> bytes:
    """``ds`` as Deflated Explicit VR Little Endian, nothing added."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(encode(ds)) + deflater.flush()


def j2k_bomb(*, declared: int = 24_000, header_rows: int = 24_000) -> Dataset:
    """A DX whose JPEG 2000 codestream declares ``declared`` x ``declared`` 16-bit pixels (a few KB); the
    dataset's Rows/Columns say ``header_rows``. Never decode it outside a memory limit."""
    ds = f.chest_radiograph()
    small = f.chest_radiograph()
    small.Rows = small.Columns = 64
    small.PixelData = np.zeros((64, 64), np.uint16).tobytes()
    small.compress(JPEG2000Lossless)
    codestream = bytearray(next(generate_frames(small.PixelData, number_of_frames=1)))
    assert codestream[:4] == b"\xff\x4f\xff\x51"
    for offset in (8, 12, 24, 28):  # Xsiz, Ysiz, XTsiz, YTsiz
        struct.pack_into(">I", codestream, offset, declared)
    ds.PixelData = encapsulate([bytes(codestream)])
    ds["PixelData"].VR = "OB"
    ds.Rows = ds.Columns = header_rows
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return ds


def save_encapsulated(ds: Dataset, path: Path) -> Path:
    """Write an encapsulated ``ds`` as pydicom encodes it (explicit VR LE body)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
