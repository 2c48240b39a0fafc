"""Bounded reading of encoded datasets: the scan follows pydicom on real files and refuses nesting, floods and
bombs before pydicom builds anything; the walk decodes every element without recursion."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from core.encoding import (
    EncodingError,
    EncodingLimitExceeded,
    decode_dataset,
    describe,
    inflate,
    printable,
    read_part10,
    scan,
    walk,
)
from core.ingest import (
    InvalidDataset,
    OutOfResources,
    decode_instance,
    read_instance,
    validate_instance,
)
from core.settings import IngestSettings
from tests import factories as f
from tests import hostile as h
from tests.peers import SHARED_DICOM

LIMITS = IngestSettings()
REAL = sorted(SHARED_DICOM.glob("*.dcm")) + sorted((SHARED_DICOM / "sr").glob("*.dcm"))


@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
def test_real_files_read_as_pydicom_reads_them(path: Path) -> None:
    ours = read_part10(path, LIMITS)
    theirs = pydicom.dcmread(path)
    assert ours.file_meta.TransferSyntaxUID == theirs.file_meta.TransferSyntaxUID
    assert list(ours.keys()) == list(theirs.keys())
    assert ours == theirs
    assert walk(ours, max_depth=LIMITS.max_sequence_depth, max_elements=LIMITS.max_elements) > 10
    assert read_part10(path.read_bytes(), LIMITS, stop_before_pixels=True) == pydicom.dcmread(
        path, stop_before_pixels=True
    )


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
)
@pytest.mark.parametrize("kind", ["sc-multiframe", "op-16bit", "dx"])
def test_synthetic_files_in_every_uncompressed_syntax(tmp_path: Path, syntax: str, kind: str) -> None:
    ds = {
        "sc-multiframe": lambda: f.secondary_capture_fundus(multiframe=True),
        "op-16bit": lambda: f.ophthalmic_photo(bits=16),
        "dx": f.chest_radiograph,
    }[kind]()
    ds.ProcedureCodeSequence = [pydicom.Dataset()]
    ds.ProcedureCodeSequence[0].CodeValue = "X"
    ds.ProcedureCodeSequence[0].ProcedureCodeSequence = [pydicom.Dataset()]
    path = f.save(ds, tmp_path / "x.dcm", syntax)
    assert read_part10(path, LIMITS) == pydicom.dcmread(path)


def test_scan_counts_elements_and_items() -> None:
    ds = f.chest_radiograph()
    del ds.PixelData
    n = len(ds)
    body = h.splice(ds, h.PROCEDURE_CODE_SEQUENCE, h.nested_sequence(3, undefined_length=True))
    # n elements, and per level: the sequence, its item, 3 codes, and the item and sequence delimiters.
    assert scan(body, implicit_vr=False, little_endian=True, max_depth=32, max_elements=10**6) == n + 3 * 7


@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_scan_refuses_nesting_beyond_the_limit_without_recursion(undefined: bool) -> None:
    ds = f.chest_radiograph()
    deep = h.splice(ds, h.PROCEDURE_CODE_SEQUENCE, h.nested_sequence(100_000, undefined_length=undefined))
    with pytest.raises(EncodingError, match="nested deeper than 32 levels"):
        scan(deep, implicit_vr=False, little_endian=True, max_depth=32, max_elements=10**7)
    # With room for it, 100,000 levels scan fine: the scan itself keeps no Python stack.
    assert scan(deep, implicit_vr=False, little_endian=True, max_depth=10**6, max_elements=10**7) > 100_000
    at_limit = h.splice(ds, h.PROCEDURE_CODE_SEQUENCE, h.nested_sequence(32, undefined_length=undefined))
    assert decode_dataset(at_limit, ExplicitVRLittleEndian, LIMITS).ProcedureCodeSequence[0].CodeValue == "P1"


def test_walk_refuses_lazily_parsed_nesting_without_recursion() -> None:
    """Defined-length sequences are parsed by pydicom one level per access: the walk stops at the limit."""
    ds = f.chest_radiograph()
    deep = h.splice(ds, h.PROCEDURE_CODE_SEQUENCE, h.nested_sequence(10_000, undefined_length=False))
    parsed = pydicom.filereader.read_dataset(io.BytesIO(deep), False, True)
    with pytest.raises(EncodingError, match="nested deeper than 32 levels"):
        walk(parsed, max_depth=32, max_elements=10**6)


def test_pydicom_recursion_on_undefined_length_nesting_is_an_encoding_error() -> None:
    """What the scan prevents: pydicom parses undefined-length sequences recursively, while reading."""
    ds = f.chest_radiograph()
    deep = h.splice(ds, h.PROCEDURE_CODE_SEQUENCE, h.nested_sequence(10_000, undefined_length=True))
    with pytest.raises(RecursionError):
        pydicom.filereader.read_dataset(io.BytesIO(deep), False, True)
    with pytest.raises(EncodingError, match="nested deeper"):
        decode_dataset(deep, ExplicitVRLittleEndian, LIMITS)


def test_element_flood_is_refused_before_parsing() -> None:
    flood = b"".join(struct.pack("<HH2sH", 0x0011, e, b"LO", 0) for e in range(0x1000, 0x10000))
    with pytest.raises(EncodingLimitExceeded, match="more than 1000 data elements"):
        decode_dataset(flood, ExplicitVRLittleEndian, IngestSettings(max_elements=1000))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (struct.pack("<HH2s2xL", 0x0008, 0x1032, b"SQ", 100), "runs past"),
        (struct.pack("<HH2s2xL", 0x0008, 0x1032, b"SQ", 0xFFFFFFFF), "truncated"),
        (struct.pack("<HH2s2xL", 0x0008, 0x1032, b"SQ", 8) + struct.pack("<HHL", 0x0008, 0x0100, 0), "item"),
        (struct.pack("<HHL", 0xFFFE, 0xE000, 0), "unexpected item"),
        (struct.pack("<HH2s2xL", 0x7FE0, 0x0010, b"OB", 0xFFFFFFFF) + b"\0" * 16, "no delimiter"),
    ],
    ids=["length-past-end", "undefined-never-closed", "non-item-in-sequence", "stray-item", "fragments-open"],
)
def test_broken_structure_is_an_encoding_error(body: bytes, match: str) -> None:
    with pytest.raises(EncodingError, match=match):
        decode_dataset(body, ExplicitVRLittleEndian, LIMITS)


def test_inflate_bounds_the_inflated_size_and_its_own_memory() -> None:
    ds = f.chest_radiograph()
    with pytest.raises(EncodingLimitExceeded, match="more than 1048576 bytes"):
        inflate(h.deflate_bomb(ds, 64 << 20), 1 << 20)
    plain = h.encode(ds)
    assert inflate(h.deflated(ds), len(plain)) == plain
    with pytest.raises(EncodingLimitExceeded):
        inflate(h.deflated(ds), len(plain) - 1)
    with pytest.raises(EncodingError, match="truncated"):
        inflate(h.deflated(ds)[:1000], 1 << 30)
    with pytest.raises(EncodingError, match="corrupt"):
        inflate(b"\xff" * 100, 1 << 30)
    assert inflate(zlib.compress(b"", wbits=-15), 10) == b""


def test_part10_without_preamble_and_non_dicom() -> None:
    ds = f.chest_radiograph()
    data = h.part10(h.encode(ds), sop_class=str(ds.SOPClassUID), sop_instance=str(ds.SOPInstanceUID))
    assert read_part10(data[132:], LIMITS).SOPInstanceUID == ds.SOPInstanceUID  # no preamble, no DICM
    with pytest.raises(EncodingError, match="not a DICOM file"):
        read_part10(b"GIF89a" + bytes(200), LIMITS)
    with pytest.raises(EncodingError, match="unknown transfer syntax"):
        read_part10(
            h.part10(b"", sop_class="1.2.3", sop_instance="1.2.3", transfer_syntax="1.2.3.4"),
            LIMITS,
        )


def test_printable_and_describe_never_carry_bytes_or_controls() -> None:
    assert printable("got b'MZ\\x90\\x00' and b\"\\x7fELF\" there") == "got <bytes> and <bytes> there"
    assert printable("Bob's b'\\x00 cut") == "Bob's <bytes>"
    assert printable("line\nbreak\x00\x1b[31m") == "line break??[31m"
    assert len(printable("x" * 10_000, 50)) == 50
    assert describe(ValueError("b'\\x00'")) == "ValueError: <bytes>"
    assert describe(KeyError()) == "KeyError"


def test_ingest_maps_limits_to_out_of_resources_and_structure_to_invalid(tmp_path: Path) -> None:
    ds = f.chest_radiograph()
    body = h.encode(ds)
    small = IngestSettings(max_instance_bytes=len(body) - 1)
    with pytest.raises(OutOfResources, match="exceeds the limit"):
        decode_instance(body, ExplicitVRLittleEndian, small)
    path = h.write(tmp_path / "x.dcm", ds, body)
    with pytest.raises(OutOfResources, match="exceeds the limit"):
        read_instance(path, small)
    with pytest.raises(OutOfResources, match="inflates to more than"):
        decode_instance(
            h.deflate_bomb(ds, 4 << 20),
            DeflatedExplicitVRLittleEndian,
            LIMITS.model_copy(update={"max_inflated_bytes": 1 << 20}),
        )
    with pytest.raises(InvalidDataset, match="runs past"):
        decode_instance(body[:-10], ExplicitVRLittleEndian, LIMITS)
    assert read_instance(path, LIMITS).SOPInstanceUID == ds.SOPInstanceUID
    assert read_instance(path.read_bytes(), LIMITS).SOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_native_pixels_from_a_file_are_a_view_of_it_not_a_copy(tmp_path: Path, syntax: str) -> None:
    ds = f.chest_radiograph()
    ds.DataSetTrailingPadding = b"\x00" * 6  # an element after the pixels is read too
    path = f.save(ds, tmp_path / "x.dcm", syntax)
    ours = read_part10(path, LIMITS)
    assert isinstance(ours.PixelData, memoryview) and ours["PixelData"].VR == "OW"
    assert ours == pydicom.dcmread(path) and "DataSetTrailingPadding" in ours
    validate_instance(ours, syntax, LIMITS)
    path.unlink()  # as a refused C-STORE's temp file is: the mapping stays readable while the view lives
    assert bytes(ours.PixelData) == ds.PixelData
