"""Photographs and radiographs uploaded as JPEG or PNG files, made into DICOM instances before they enter the
pipeline (``POST /api/upload``): a fundus photograph as a VL Photographic Image (modality XC, routed to the
glaucoma model), a chest radiograph as a Secondary Capture Image (modality DX, body part CHEST, routed to the
chest models).

Both are built with highdicom's Secondary Capture constructor (patient, study, series, equipment, image and
SOP common modules, UIDs from highdicom), the fundus one then turned into the VL Photographic Image IOD (its
SOP class, modality XC, the VL Image and Acquisition Context modules, no SC Equipment module). Pixels are kept
losslessly as decoded (uncompressed Explicit VR Little Endian): 8-bit RGB for a colour photograph, 8- or
16-bit MONOCHROME2 for a grey radiograph (an RGB file whose three channels are equal is grey); a JPEG source
is marked Lossy Image Compression 01 (ISO_10918_1). Nothing of the file's metadata (EXIF, text chunks, ICC
profile) is carried over: only the pixels, oriented as the EXIF Orientation tag shows them, and what the
user typed. A given optic-disc crop (a square in the photograph's pixels) becomes the image, described in
Derivation Description, so the model reads the crop.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import highdicom as hd
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, VLPhotographicImageStorage
from pydicom.valuerep import DA, TM

from core.domain import UPLOAD_MANUFACTURER, software_version

Kind = Literal["fundus", "chest"]
KINDS: tuple[Kind, ...] = ("fundus", "chest")
_FORMATS = {"JPEG": "ISO_10918_1", "PNG": None}
_DATE = re.compile(r"^\d{8}$")
_SEX = {"M", "F", "O"}
_LATERALITY = {"R", "L"}
#: Our device identification in every converted image (General Equipment module)
DEVICE_MODEL = "image upload"


class UploadRefused(ValueError):
    """A file or form value that cannot become DICOM: ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Demographics:
    """What the user typed; empty values are left empty (Type 2)."""

    patient_id: str = ""
    patient_name: str = ""
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""  # M | F | O
    laterality: str = ""  # R | L (fundus)
    accession_number: str = ""

    def checked(self) -> Demographics:
        """The same, normalised; UploadRefused (422) naming the first bad value."""
        birth = self.birth_date.replace("-", "").strip()
        if birth and (not _DATE.match(birth) or not _valid_date(birth)):
            raise UploadRefused("birth date: use YYYY-MM-DD")
        sex, side = self.sex.strip().upper(), self.laterality.strip().upper()
        if sex and sex not in _SEX:
            raise UploadRefused("sex: M, F or O")
        if side and side not in _LATERALITY:
            raise UploadRefused("laterality: R or L")
        for name, value, limit in (
            ("patient ID", self.patient_id, 64),
            ("patient name", self.patient_name, 64),
            ("accession number", self.accession_number, 16),
        ):
            if len(value.strip()) > limit or any(ord(c) < 32 or c == "\\" for c in value):
                raise UploadRefused(f"{name}: at most {limit} characters, no control characters or backslash")
        return Demographics(
            patient_id=self.patient_id.strip(),
            patient_name=self.patient_name.strip().replace(",", "^"),
            birth_date=birth,
            sex=sex,
            laterality=side,
            accession_number=self.accession_number.strip(),
        )


@dataclass(frozen=True)
class Crop:
    """A square of ``size`` pixels with its top-left corner at (x, y), in the photograph's pixels."""

    x: int
    y: int
    size: int


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # H x W x 3 uint8, or H x W uint8/uint16
    format: str  # JPEG | PNG


def _valid_date(value: str) -> bool:
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return False
    return True


def decode_image(data: bytes, *, max_pixels: int) -> Decoded:
    """The pixels of a JPEG or PNG file; UploadRefused for anything else, an image that does not decode, or
    one of more than ``max_pixels`` pixels (read from the header, before decoding: decompression bombs)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=("JPEG", "PNG"))
            width, height = opened.size
            if width * height > max_pixels:
                raise UploadRefused(
                    f"{width} x {height} pixels is more than the limit of {max_pixels} pixels", 413
                )
            fmt = str(opened.format)
            image = ImageOps.exif_transpose(opened)
            image.load()
    except UploadRefused:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise UploadRefused(f"not a JPEG or PNG image ({type(exc).__name__})", 415) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise UploadRefused(f"the image cannot be decoded: {str(exc)[:200]}") from None
    return Decoded(_pixels(image), fmt)


def _pixels(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image)
        if array.dtype != np.uint16:
            if array.min() < 0 or array.max() > 65535:
                raise UploadRefused("32-bit images are not supported")
            array = array.astype(np.uint16)
        return array
    if mode in ("L", "1", "P", "LA", "PA") and not _palette_in_colour(image):
        return np.asarray(image.convert("L"))
    rgb = np.asarray(image.convert("RGB"))
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    return rgb


def _palette_in_colour(image: Image.Image) -> bool:
    if image.mode not in ("P", "PA"):
        return False
    rgb = np.asarray(image.convert("RGB"))
    return not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]))


def crop_square(pixels: np.ndarray, crop: Crop) -> np.ndarray:
    """The square ``crop`` of ``pixels``; UploadRefused unless it lies inside the image and is at least 32
    pixels wide."""
    h, w = pixels.shape[:2]
    if crop.size < 32 or crop.x < 0 or crop.y < 0 or crop.x + crop.size > w or crop.y + crop.size > h:
        raise UploadRefused(f"the crop must be a square of at least 32 pixels inside the {w} x {h} image")
    return np.ascontiguousarray(pixels[crop.y : crop.y + crop.size, crop.x : crop.x + crop.size])


def to_dicom(
    decoded: Decoded,
    kind: Kind,
    demographics: Demographics,
    *,
    study_uid: str,
    series_uid: str,
    instance_number: int,
    crop: Crop | None = None,
    now: datetime | None = None,
) -> Dataset:
    """One uploaded image as a DICOM instance of a new study (``study_uid``), ready for the ingest path."""
    if kind not in KINDS:
        raise UploadRefused(f"kind must be one of {', '.join(KINDS)}")
    pixels = decoded.pixels
    derivation = f"converted from an uploaded {decoded.format} file by screening-gateway"
    if crop is not None:
        if kind != "fundus":
            raise UploadRefused("a crop is for fundus photographs only")
        pixels = crop_square(pixels, crop)
        derivation += f"; optic-disc crop: {crop.size} x {crop.size} pixels at ({crop.x}, {crop.y})"
    if kind == "fundus" and pixels.ndim != 3:
        raise UploadRefused("a fundus photograph must be a colour image")
    if kind == "fundus" and pixels.dtype != np.uint8:
        raise UploadRefused("a fundus photograph must have 8 bits per channel")
    now = now or datetime.now()
    colour = pixels.ndim == 3
    bits = 16 if pixels.dtype == np.uint16 else 8
    ds = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB" if colour else "MONOCHROME2",
        bits_allocated=bits,
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),  # the constructor wants one; unknown for an upload: emptied below
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        series_number=1,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=UPLOAD_MANUFACTURER,
        patient_id=demographics.patient_id or None,
        patient_name=demographics.patient_name or None,
        patient_birth_date=demographics.birth_date or None,
        patient_sex=demographics.sex or None,
        accession_number=demographics.accession_number or None,
        study_date=now.date(),
        study_time=now.time(),
        study_id="UPLOAD",
        laterality=demographics.laterality or None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    ds.PatientOrientation = []  # Type 2: nothing says how the uploaded image is oriented
    ds.ManufacturerModelName = DEVICE_MODEL
    ds.SoftwareVersions = software_version()
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = derivation[:1024]
    ds.BurnedInAnnotation = "NO"
    lossy = _FORMATS.get(decoded.format)
    ds.LossyImageCompression = "01" if lossy else "00"
    if lossy:
        ds.LossyImageCompressionMethod = lossy
    ds.ContentDate, ds.ContentTime = DA(now.strftime("%Y%m%d")), TM(now.strftime("%H%M%S"))
    if kind == "chest":
        ds.Modality = "DX"
        ds.BodyPartExamined = "CHEST"
        ds.SeriesDescription = "Uploaded chest radiograph"
        ds.StudyDescription = "Chest radiograph (uploaded image)"
        return ds
    return _as_vl_photographic(ds, demographics)


def _as_vl_photographic(ds: Dataset, demographics: Demographics) -> Dataset:
    """The Secondary Capture dataset turned into a VL Photographic Image (PS3.3 A.33.4)."""
    ds.SOPClassUID = VLPhotographicImageStorage
    ds.file_meta.MediaStorageSOPClassUID = VLPhotographicImageStorage
    ds.Modality = "XC"
    ds.SeriesDescription = "Uploaded fundus photograph"
    ds.StudyDescription = "Fundus photograph (uploaded image)"
    for keyword in ("ConversionType", "DateOfSecondaryCapture", "TimeOfSecondaryCapture"):
        if keyword in ds:
            delattr(ds, keyword)
    if demographics.laterality:  # of the image (VL Image module), not the series
        ds.ImageLaterality = demographics.laterality
        if "Laterality" in ds:
            del ds.Laterality
    ds.AcquisitionContextSequence = DicomSequence()
    ds.AnatomicRegionSequence = DicomSequence([_code("81745001", "SCT", "Eye")])
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item
