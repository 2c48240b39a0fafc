"""Seed datasets for the fuzzer, each as the bytes a sender puts in P-DATA (no preamble, no file meta).

- ``vendor/*``: the real vendor files of ../shared/dicom as they are (CR JPEG-LS, CR RLE, DX, SC fundus J2K).
  Big (up to 2.8 MB; a decode takes 0.1-0.5 s), so drawn rarely.
- ``mini/*``: the same vendor headers with the pixels shrunk to 64 x 56 and encoded again in the file's own
  transfer syntax (and its lossless/lossy sibling), plus the small DX in every uncompressed syntax.
- ``factory/*``: tests/factories.py datasets (DX 12 bit, OP 8 bit RGB, 2-frame SC), native and compressed by
  dcmtk (JPEG baseline, extended, lossless, JPEG-LS, RLE), with fixed UIDs.

Everything is built at run time from ../shared (nothing of it is stored in the repository); the bytes are the
same on every build, so a recipe (seed name + mutations) replays the same input.
"""

from __future__ import annotations

import functools
import hashlib
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from tests import factories
from tests.peers import SHARED_DICOM

VENDOR_FILES = ("cr_chest_jpegls", "cr_hip_rle", "dx_chest_small", "sc_fundus_j2k")
#: Share of cases drawn from each family, the seeds of a family equally (the vendor files are slow to decode).
FAMILY_WEIGHTS = {"vendor": 0.02, "mini": 0.49, "factory": 0.49}
MINI_SHAPE = (56, 64)  # rows, columns


@dataclass(frozen=True)
class Seed:
    name: str
    #: How ``stream`` is encoded (for deflated seeds: the inflated stream, explicit VR little endian).
    encoding: str
    #: The transfer syntax the sender declares (Deflated seeds get a "deflate" mutation).
    transfer_syntax: str
    stream: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.stream).hexdigest()[:16]

    @property
    def deflated(self) -> bool:
        return UID(self.transfer_syntax).is_deflated


def encode_stream(ds: Dataset, transfer_syntax: str) -> bytes:
    """The dataset (without file meta) encoded as a sender would put it in P-DATA."""
    ts = UID(transfer_syntax)
    implicit = ts.is_implicit_VR
    little = ts.is_little_endian
    buffer = DicomBytesIO()
    buffer.is_little_endian = little
    buffer.is_implicit_VR = implicit
    # pydicom refuses to write a dataset read in one encoding in another unless told which; so tell it.
    for _ in ds.iterall():
        pass  # convert raw elements, so that their values are written in the new byte order
    ds.set_original_encoding(implicit, little)
    write_dataset(buffer, ds)
    return buffer.getvalue()


@functools.cache
def all_seeds() -> tuple[Seed, ...]:
    """Every seed, in a fixed order (built once per process; about two seconds)."""
    seeds = [*_vendor(), *_mini(), *_factory()]
    return tuple(seeds)


def seeds_by_name() -> dict[str, Seed]:
    return {seed.name: seed for seed in all_seeds()}


def file_seed(name: str, path: Path) -> Seed:
    """A DICOM file's dataset as its sender would put it in P-DATA, declared in its own transfer syntax."""
    raw = path.read_bytes()
    ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    return Seed(name, ts, ts, raw[_stream_offset(raw) :])


def _vendor() -> list[Seed]:
    return [file_seed(f"vendor/{name}", SHARED_DICOM / f"{name}.dcm") for name in VENDOR_FILES]


def _stream_offset(raw: bytes) -> int:
    """Where the dataset starts in a Part 10 file: after the preamble and the file meta group."""
    with io.BytesIO(raw) as fp:
        pydicom.filereader.read_preamble(fp, False)
        pydicom.filereader._read_file_meta_info(fp)
        return fp.tell()


def _mini() -> list[Seed]:
    specs: list[tuple[str, str, str]] = [
        ("cr_hip_rle", "rle", RLELossless),
        ("cr_chest_jpegls", "jpegls-near", JPEGLSNearLossless),
        ("cr_chest_jpegls", "jpegls", JPEGLSLossless),
        ("sc_fundus_j2k", "j2k", JPEG2000),
        ("sc_fundus_j2k", "j2k-lossless", JPEG2000Lossless),
    ]
    variants: list[tuple[str, Dataset, str, str]] = []
    for name, label, ts in specs:
        variants.append((f"mini/{name}.{label}", _shrunk(name, ts), ts, ts))
    dx = pydicom.dcmread(SHARED_DICOM / "dx_chest_small.dcm")
    for label, ts in (
        ("explicit", ExplicitVRLittleEndian),
        ("implicit", ImplicitVRLittleEndian),
        ("big-endian", ExplicitVRBigEndian),
    ):
        variants.append((f"mini/dx_chest_small.{label}", dx, ts, ts))
    variants.append(
        ("mini/dx_chest_small.deflated", dx, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
    )
    return [Seed(name, enc, ts, encode_stream(ds, enc)) for name, ds, enc, ts in variants]


def _shrunk(name: str, transfer_syntax: str) -> Dataset:
    """The vendor file's dataset, pixels shrunk to MINI_SHAPE and encoded again in ``transfer_syntax``."""
    ds = pydicom.dcmread(SHARED_DICOM / f"{name}.dcm")
    arr = ds.pixel_array
    rows, columns = MINI_SHAPE
    small = np.ascontiguousarray(cv2.resize(arr, (columns, rows), interpolation=cv2.INTER_AREA))
    ds.Rows, ds.Columns = rows, columns
    options: dict[str, Any] = {}
    colour = small.ndim == 3
    if colour:
        ds.PhotometricInterpretation = "RGB"  # the decoder already turned YBR_ICT into RGB
    if transfer_syntax == JPEGLSNearLossless:
        options["jls_error"] = 2
    if transfer_syntax == JPEG2000:
        options["j2k_cr"] = [20]
    ds.compress(transfer_syntax, small, generate_instance_uid=False, **options)
    if colour and transfer_syntax in (JPEG2000, JPEG2000Lossless):
        # pydicom applies the multiple-component transform to RGB input: say so, as the vendor file does.
        ds.PhotometricInterpretation = "YBR_ICT" if transfer_syntax == JPEG2000 else "YBR_RCT"
    return ds


def _factory() -> list[Seed]:
    made: list[tuple[str, Dataset, str]] = []
    chest = factories.chest_radiograph()
    photo = factories.ophthalmic_photo()
    frames = factories.secondary_capture_fundus(multiframe=True)
    for label, ds in (("dx12", chest), ("op8", photo), ("sc2frames", frames)):
        _fix_uids(ds, label)  # before dcmtk, which references the original in Source Image Sequence
    made.append(("factory/dx12.explicit", chest, ExplicitVRLittleEndian))
    made.append(("factory/op8.explicit", photo, ExplicitVRLittleEndian))
    made.append(("factory/sc2frames.implicit", frames, ImplicitVRLittleEndian))
    with tempfile.TemporaryDirectory(prefix="fuzz-seeds-") as tmp:
        for label, ds, codec in (
            ("dx12.jpeg-lossless", chest, "jpeg-lossless-sv1"),
            ("dx12.jpeg-extended", chest, "jpeg-extended"),
            ("dx12.jpeg-ls", chest, "jpeg-ls"),
            ("dx12.rle", chest, "rle"),
            ("op8.jpeg-baseline", photo, "jpeg-baseline"),
            ("sc2frames.rle", frames, "rle"),
        ):
            path = factories.save(ds, Path(tmp) / f"{label}.dcm", codec)
            made.append((f"factory/{label}", pydicom.dcmread(path), ""))
    seeds = []
    for name, ds, ts in made:
        _fix_uids(ds, name)
        syntax = ts or str(ds.file_meta.TransferSyntaxUID)
        seeds.append(Seed(name, syntax, syntax, encode_stream(ds, syntax)))
    return seeds


def _fix_uids(ds: Dataset, name: str) -> None:
    """Same UIDs and no creation time on every build, so the seed's bytes (and every recipe) replay."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, generate_uid(entropy_srcs=["fuzz-seed", name, keyword]))
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"):
        if keyword in ds:
            del ds[keyword]
