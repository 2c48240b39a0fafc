"""The pixel budget: real codestreams of every syntax we accept pass, lying or oversized ones do not."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest

from core.pixels import (
    CodestreamMismatch,
    PixelBudgetExceeded,
    PixelDataError,
    check_decodable,
    geometry,
)
from core.settings import IngestSettings
from tests import factories as f
from tests import hostile as h
from tests.peers import SHARED_DICOM

LIMITS = IngestSettings()
SYNTAXES = ["jpeg-baseline", "jpeg-extended", "jpeg-lossless-sv1", "jpeg-ls", "jpeg-ls-near", "rle"]


def _check(ds: pydicom.Dataset) -> None:
    check_decodable(ds, str(ds.file_meta.TransferSyntaxUID), LIMITS)


@pytest.mark.parametrize("name", [p.name for p in sorted(SHARED_DICOM.glob("*.dcm"))])
def test_real_vendor_files_are_decodable(name: str) -> None:
    _check(pydicom.dcmread(SHARED_DICOM / name))


def test_rle_panic_file_passes_the_header_checks() -> None:
    """Its damage is inside an RLE segment: only decoding finds it (the worker then reports it)."""
    _check(pydicom.dcmread(h.RLE_PANIC))


@pytest.mark.parametrize("syntax", SYNTAXES)
@pytest.mark.parametrize("kind", ["gray", "colour-multiframe"])
def test_dcmtk_codestreams_agree_with_their_headers(tmp_path: Path, syntax: str, kind: str) -> None:
    if kind == "gray":
        ds = f.chest_radiograph() if syntax not in ("jpeg-baseline",) else f.vl_photographic()
    else:
        ds = f.secondary_capture_fundus(multiframe=True)
    path = f.save(ds, tmp_path / "x.dcm", syntax)
    encoded = pydicom.dcmread(path)
    _check(encoded)
    if syntax == "rle":  # an RLE header counts segments (one per sample and byte), it has no size
        if encoded.BitsAllocated == 16:
            encoded.BitsAllocated, encoded.BitsStored, encoded.HighBit = 8, 8, 7
        else:
            encoded.BitsAllocated = 16
    else:
        encoded.Rows += 2
    with pytest.raises(CodestreamMismatch, match="frame 1"):
        _check(encoded)


def test_every_frame_is_checked(tmp_path: Path) -> None:
    path = f.save(f.secondary_capture_fundus(multiframe=True), tmp_path / "x.dcm", "jpeg-ls")
    ds = pydicom.dcmread(path)
    frames = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=2))
    small = f.secondary_capture_fundus()
    small.Rows = small.Columns = 128
    small.PixelData = small.PixelData[: 128 * 128 * 3]
    other = pydicom.dcmread(f.save(small, tmp_path / "small.dcm", "jpeg-ls"))
    second = next(pydicom.encaps.generate_frames(other.PixelData, number_of_frames=1))
    ds.PixelData = pydicom.encaps.encapsulate([frames[0], second])
    with pytest.raises(CodestreamMismatch, match="frame 2: codestream declares 128 x 128"):
        _check(ds)
    ds.PixelData = pydicom.encaps.encapsulate([frames[0]])
    with pytest.raises(CodestreamMismatch, match="holds 1 of 2 frames"):
        _check(ds)


def test_jpeg2000_bomb_exceeds_the_budget_and_a_liar_mismatches() -> None:
    with pytest.raises(PixelBudgetExceeded, match="576000000 pixels exceed the limit of 400000000"):
        _check(h.j2k_bomb())
    with pytest.raises(PixelBudgetExceeded, match="1152000000 decoded pixel bytes exceed"):
        check_decodable(h.j2k_bomb(), "1.2.840.10008.1.2.4.90", IngestSettings(max_pixels=10**9))
    with pytest.raises(CodestreamMismatch, match="codestream declares 24000 x 24000 x 1 samples of 12 bits"):
        _check(h.j2k_bomb(header_rows=256))


@pytest.mark.parametrize(
    ("keyword", "value", "match"),
    [
        ("Rows", 0, "Rows 0 outside"),
        ("Columns", None, "without Columns"),
        ("NumberOfFrames", "0", "NumberOfFrames 0 outside"),
        ("NumberOfFrames", "2147483648", "outside"),
        ("BitsAllocated", 65, "BitsAllocated 65 outside"),
        ("SamplesPerPixel", 2, "Samples per Pixel"),
        ("BitsAllocated", 12, "Bits Allocated"),
    ],
)
def test_absurd_descriptions(keyword: str, value: object, match: str) -> None:
    ds = f.chest_radiograph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values it is given
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    with pytest.raises(PixelDataError, match=match):
        _check(ds)


def test_geometry_uses_python_integers() -> None:
    ds = f.chest_radiograph()
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 2**31 - 1
    ds.SamplesPerPixel = 3
    ds.BitsAllocated = 64
    shape = geometry(ds)
    assert shape.decoded_bytes == 65535 * 65535 * 3 * (2**31 - 1) * 8  # no int64 wrap-around
    with pytest.raises(PixelBudgetExceeded):
        _check(ds)
