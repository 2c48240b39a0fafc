"""Dataset factories: OP, VL Photographic, SC (single and multi-frame true colour), DX, CR objects.

Pixels come from the real training images in ../shared/data (read by path, never copied into the repo).
Compressed variants are made by dcmtk's own encoders (dcmcjpeg, dcmcjpls, dcmcrle) so the bytes are a real
implementation's, not ours.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from tests.peers import SHARED

OP_8 = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP_16 = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
VL_PHOTO = "1.2.840.10008.5.1.4.1.1.77.1.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
SC_MF_TRUE_COLOR = "1.2.840.10008.5.1.4.1.1.7.4"
CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"

FUNDUS_DIR = SHARED / "data" / "fundus-glaucoma" / "images"
CHEST_DIR = SHARED / "data" / "chest-xray-pneumonia" / "images"


def fundus_rgb(size: int = 256, index: int = 0) -> np.ndarray:
    path = sorted((FUNDUS_DIR / "normal").glob("*.jpg"))[index]
    return cv2.resize(_read(path, cv2.IMREAD_COLOR)[..., ::-1], (size, size), interpolation=cv2.INTER_AREA)


def chest_gray(size: int = 256, index: int = 0) -> np.ndarray:
    path = sorted((CHEST_DIR / "normal").glob("*.jpeg"))[index]
    return cv2.resize(_read(path, cv2.IMREAD_GRAYSCALE), (size, size), interpolation=cv2.INTER_AREA)


def _read(path: Path, flags: int) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    if image is None:
        raise FileNotFoundError(f"cannot read {path}")
    return np.ascontiguousarray(image)


def base_dataset(
    sop_class: str,
    modality: str,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "TEST-001",
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "TestVendor"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray, *, bits: int = 8) -> Dataset:
    if (pixels.ndim == 3 and pixels.shape[-1] == 3) or pixels.ndim == 4:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    frames = pixels.shape[0] if pixels.ndim == 4 else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if ds.SamplesPerPixel == 3 else pixels.shape[-2:]
    ds.BitsAllocated = 16 if bits > 8 else 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    dtype = np.uint16 if bits > 8 else np.uint8
    ds.PixelData = np.ascontiguousarray(pixels.astype(dtype)).tobytes()
    return ds


def ophthalmic_photo(*, bits: int = 8, **kw: str) -> Dataset:
    ds = base_dataset(OP_16 if bits > 8 else OP_8, "OP", **kw)
    rgb = fundus_rgb().astype(np.uint16) * (257 if bits > 8 else 1)
    ds.Laterality = "R"
    return _set_pixels(ds, rgb, bits=bits)


def vl_photographic(**kw: str) -> Dataset:
    ds = base_dataset(VL_PHOTO, "XC", **kw)
    return _set_pixels(ds, fundus_rgb())


def secondary_capture_fundus(
    *, multiframe: bool = False, description: str = "Fundus photograph", **kw: str
) -> Dataset:
    ds = base_dataset(SC_MF_TRUE_COLOR if multiframe else SC, "OT", **kw)
    ds.ConversionType = "DI"
    ds.SeriesDescription = description
    rgb = fundus_rgb()
    return _set_pixels(ds, np.stack([rgb, fundus_rgb(index=1)]) if multiframe else rgb)


def chest_radiograph(
    *, sop_class: str = DX_PRESENTATION, modality: str = "DX", body_part: str | None = "CHEST", **kw: str
) -> Dataset:
    ds = base_dataset(sop_class, modality, **kw)
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if sop_class.startswith(DX_PRESENTATION[:-2]) and modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION" if sop_class == DX_PRESENTATION else "FOR PROCESSING"
    ds.ViewPosition = "PA"
    gray = chest_gray().astype(np.uint16) * 16  # 12-bit
    ds = _set_pixels(ds, gray, bits=12)
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    return ds


def save(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Write ``ds`` with an uncompressed syntax, or compress it with dcmtk ("jpeg-baseline", ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        ds.save_as(path, enforce_file_format=True)
        return path
    raw = path.with_suffix(".raw.dcm")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(raw, enforce_file_format=True)
    tool = {
        "jpeg-baseline": ["dcmcjpeg", "+eb"],
        "jpeg-extended": ["dcmcjpeg", "+ee"],
        "jpeg-lossless": ["dcmcjpeg", "+el"],
        "jpeg-lossless-sv1": ["dcmcjpeg", "+e1"],
        "jpeg-ls": ["dcmcjpls", "+el"],
        "jpeg-ls-near": ["dcmcjpls", "+en"],
        "rle": ["dcmcrle"],
    }[transfer_syntax]
    subprocess.run([*tool, str(raw), str(path)], check=True, capture_output=True)
    raw.unlink()
    return path
