"""Pixels for the models: DICOM (and PNG/JPEG) to float32 in [0, 1], bone bright, colour as RGB.

DICOM grayscale follows the display pipeline of PS3.3 C.11: Modality LUT or rescale, then the first VOI LUT or
window of the dataset (when there is none, or it is unusable: a 0.5-99.5 percentile window), then
MONOCHROME1 is inverted so that bone and tissue are bright and air is dark. Colour is decoded with
``as_rgb`` semantics: pydicom 3 already turns YBR_FULL/YBR_FULL_422 into RGB and the JPEG 2000 decoders
undo the YBR_ICT/YBR_RCT component transform themselves, so we only convert what the decoder reports as still
YBR. Multi-frame objects: :func:`load_dicom_image` returns the first frame, :func:`iter_frames` all.

Nothing is decoded before the pixel budget (core.pixels) is checked against the header and every frame's
codestream header; whatever a codec raises, a Rust ``PanicException`` (a BaseException) included, becomes
:class:`UnreadableImage`.

This module must not import TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    get_decoder,
)

from core.encoding import describe
from core.pixels import PIXEL_KEYWORDS, PixelDataError, check_decodable
from core.settings import IngestSettings

logger = logging.getLogger(__name__)

_PERCENTILE_WINDOW = (0.5, 99.5)
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}

DicomSource = Dataset | str | PathLike[str]


class UnreadableImage(ValueError):
    """The object has no pixel data, or its pixels cannot be decoded or understood."""


def read_dataset(ds_or_path: DicomSource) -> Dataset:
    """The dataset itself, or the file read with pydicom (``UnreadableImage`` when it is not DICOM)."""
    if isinstance(ds_or_path, Dataset):
        return ds_or_path
    try:
        return pydicom.dcmread(ds_or_path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise UnreadableImage(f"cannot read DICOM file {Path(ds_or_path).name}: {describe(exc)}") from exc
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # RecursionError on absurd nesting, anything else a broken file causes
        raise UnreadableImage(f"cannot read DICOM file {Path(ds_or_path).name}: {describe(exc)}") from None


def number_of_frames(ds: Dataset) -> int:
    """(0028,0008) Number of Frames, 1 when absent or empty."""
    return int(ds.get("NumberOfFrames") or 1)


def load_dicom_image(
    ds_or_path: DicomSource, *, frame: int = 0, limits: IngestSettings | None = None
) -> np.ndarray:
    """One frame (the first by default) as float32 in [0, 1]: HxW for grayscale, HxWx3 RGB for colour.

    ``limits`` (default: the default ingest limits) bound what decoding may cost; beyond them, or for a
    codestream that contradicts the header, the image is unreadable and nothing is decoded.
    """
    ds = read_dataset(ds_or_path)
    _require_pixels(ds, limits)
    if not 0 <= frame < number_of_frames(ds):
        raise UnreadableImage(f"frame {frame} out of range (NumberOfFrames {number_of_frames(ds)})")
    arr, meta = _decode(ds, frame)
    return _unit_range(arr, meta, ds)


def iter_frames(ds_or_path: DicomSource, *, limits: IngestSettings | None = None) -> Iterator[np.ndarray]:
    """Every frame, each as :func:`load_dicom_image` returns it; frames are decoded one at a time."""
    ds = read_dataset(ds_or_path)
    _require_pixels(ds, limits)
    for index in range(number_of_frames(ds)):
        arr, meta = _decode(ds, index)
        yield _unit_range(arr, meta, ds)


def load_image_file(path: str | PathLike[str]) -> np.ndarray:
    """A PNG or JPEG as float32 in [0, 1]: HxW when the file is grayscale, HxWx3 in RGB order otherwise."""
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise UnreadableImage(f"cannot decode image file {Path(path).name}")
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(img.dtype, 1.0)
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
        elif img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        else:
            img = img[..., 0]
    return np.clip(img.astype(np.float32) / scale, 0.0, 1.0)


def is_dicom_file(path: str | PathLike[str]) -> bool:
    """True when the file carries the 'DICM' prefix after the 128-byte preamble."""
    try:
        return bool(pydicom.misc.is_dicom(str(path)))
    except OSError:
        return False


def load_any(path: str | PathLike[str]) -> np.ndarray:
    """DICOM (sniffed from the file content) or PNG/JPEG, as float32 in [0, 1]."""
    if is_dicom_file(path):
        return load_dicom_image(path)
    if Path(path).suffix.lower() in _IMAGE_SUFFIXES:
        return load_image_file(path)
    # Without the preamble a file may still be DICOM (some old files); let the image decoder try first.
    try:
        return load_image_file(path)
    except UnreadableImage:
        pass
    try:
        return load_dicom_image(pydicom.dcmread(path, force=True))
    except UnreadableImage:
        raise
    except Exception as exc:
        raise UnreadableImage(f"{Path(path).name} is neither DICOM nor PNG/JPEG") from exc


def to_model_input(img: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Resize to ``size`` x ``size`` (INTER_AREA) and give it ``channels`` (1 or 3): float32 HxWxC."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    x: np.ndarray = np.asarray(img, dtype=np.float32)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] != 3):
        raise ValueError(f"expected HxW or HxWx3 image, got shape {x.shape}")
    x = cv2.resize(x, (size, size), interpolation=cv2.INTER_AREA)
    if channels == 1:
        if x.ndim == 3:
            x = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
        return x[..., np.newaxis]
    if x.ndim == 2:
        x = cv2.cvtColor(x, cv2.COLOR_GRAY2RGB)
    return x


# -- decoding ------------------------------------------------------------------------------------------------


def _require_pixels(ds: Dataset, limits: IngestSettings | None) -> None:
    """Pixel data that may be decoded: present, described completely and within the budget."""
    if not any(keyword in ds for keyword in PIXEL_KEYWORDS):
        raise UnreadableImage("dataset has no pixel data")
    try:
        tsyntax = ds.file_meta.TransferSyntaxUID
    except AttributeError as exc:
        raise UnreadableImage("dataset has no Transfer Syntax UID") from exc
    try:
        check_decodable(ds, str(tsyntax), limits or IngestSettings())
    except PixelDataError as exc:
        raise UnreadableImage(f"pixel data not decoded: {exc}") from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a header element that does not decode
        raise UnreadableImage(f"pixel data not decoded: {describe(exc)}") from None


def _decode(ds: Dataset, index: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Decoded frame and the decoder's description of it (photometric interpretation after conversion)."""
    try:
        tsyntax = ds.file_meta.TransferSyntaxUID
    except AttributeError as exc:
        raise UnreadableImage("dataset has no Transfer Syntax UID") from exc
    try:
        decoder = get_decoder(tsyntax)
        options: dict[str, Any] = {"as_rgb": True}  # YBR_FULL(_422) to RGB; pydicom's default, made explicit
        arr, meta = decoder.as_array(ds, index=index, **options)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # every plugin raises its own types; pylibjpeg-rle panics (BaseException)
        raise UnreadableImage(f"cannot decode pixel data ({tsyntax.name}): {describe(exc)}") from None
    return arr, dict(meta)


def _unit_range(arr: np.ndarray, meta: dict[str, Any], ds: Dataset) -> np.ndarray:
    """:func:`_to_unit_range`; a LUT or window that cannot be applied makes the image unreadable."""
    try:
        image = _to_unit_range(arr, meta, ds)
    except UnreadableImage:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # malformed LUTs, absurd rescale values, out of memory
        raise UnreadableImage(f"cannot convert pixel values: {describe(exc)}") from None
    if not np.isfinite(image).all():  # e.g. Rescale Slope -1e308: NaN would reach the model and the SR
        raise UnreadableImage("pixel values not finite after the modality LUT / VOI window")
    return image


def _to_unit_range(arr: np.ndarray, meta: dict[str, Any], ds: Dataset) -> np.ndarray:
    photometric = str(meta.get("photometric_interpretation") or ds.get("PhotometricInterpretation", ""))
    photometric = photometric.strip().upper()
    bits_stored = int(meta.get("bits_stored") or ds.get("BitsStored") or 8)
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise UnreadableImage(f"unexpected grayscale frame shape {arr.shape}")
        return _grayscale(arr, ds, photometric)
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as exc:
            raise UnreadableImage(f"cannot apply palette colour LUT: {exc}") from exc
        return _scale_colour(rgb, 8 * rgb.dtype.itemsize)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise UnreadableImage(f"unexpected colour frame shape {arr.shape} for {photometric}")
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        # Only reached when the decoder left the data in YBR; never convert what it already converted.
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric != "RGB":
        # YBR_ICT/YBR_RCT are undone inside the JPEG 2000 codec; anything else we take as RGB and say so.
        logger.warning("treating photometric interpretation %s as RGB", photometric)
    return _scale_colour(arr, bits_stored)


def _scale_colour(arr: np.ndarray, bits: int) -> np.ndarray:
    out = arr.astype(np.float32) / float(2**bits - 1)
    return np.clip(out, 0.0, 1.0)


def _grayscale(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    values = apply_modality_lut(arr, ds)
    img = _voi_window(values, ds)
    if img is None:
        img = _percentile_window(values)
    # MONOCHROME1 is displayed inverted; a Presentation LUT Shape of INVERSE on MONOCHROME1 (as the DX IOD
    # requires) states the same inversion, whereas on MONOCHROME2 it asks for one.
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    if photometric == "MONOCHROME1" or shape == "INVERSE":
        img = 1.0 - img
    return np.ascontiguousarray(img, dtype=np.float32)


def _voi_window(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The dataset's first VOI LUT or window scaled to [0, 1]; None when absent or unusable."""
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_lut or has_window):
        return None
    if not has_lut:
        linear = _linear_window(values, ds)
        if linear is not None:
            return linear
    try:
        if has_lut:
            if np.issubdtype(values.dtype, np.floating) and np.all(np.mod(values, 1) == 0):
                values = values.astype(np.int64)  # a rescale of 1/0 gives floats; the LUT indexes integers
            lo, hi = _lut_output_range(ds)
        else:
            lo, hi = _window_output_range(ds)
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    except (ValueError, TypeError, IndexError, AttributeError, NotImplementedError) as exc:
        logger.warning("ignoring unusable VOI in SOP instance %s: %s", ds.get("SOPInstanceUID", "?"), exc)
        return None
    if hi <= lo:
        return None
    img = (np.asarray(out, dtype=np.float64) - lo) / (hi - lo)
    return _unless_flat(np.clip(img, 0.0, 1.0), values, ds)


def _unless_flat(img: np.ndarray, values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """``img``, or None when the window maps a varied image to one gray level (wrong for this image: the
    caller uses the data instead)."""
    if np.ptp(img) < 1e-3 < np.ptp(values):
        logger.warning(
            "VOI of SOP instance %s flattens the image; using a percentile window",
            ds.get("SOPInstanceUID", "?"),
        )
        return None
    return img


def _linear_window(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The first window with VOI LUT Function LINEAR (the default), scaled to [0, 1], in float32 (PS3.3
    C.11.2.1.2.1: clipping the linear segment gives exactly its piecewise definition, whatever the output
    range). None for anything else (LINEAR_EXACT, SIGMOID, a width of 1 or less, unreadable values): those
    take pydicom's ``apply_voi_lut``, which computes in float64 and takes about 75 ms for a 2000 × 1880 CR.
    """
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    try:
        center, width = (float(_first(ds.WindowCenter)), float(_first(ds.WindowWidth)))
    except (TypeError, ValueError, IndexError):
        return None
    if function != "LINEAR" or not (np.isfinite(center) and np.isfinite(width) and width > 1):
        return None
    img = values.astype(np.float32)
    img -= np.float32(center - 0.5)
    img /= np.float32(width - 1)
    img += np.float32(0.5)
    np.clip(img, 0.0, 1.0, out=img)
    return _unless_flat(img, values, ds)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, MultiValue | list | tuple) else value


def _lut_output_range(ds: Dataset) -> tuple[float, float]:
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    entries = int(descriptor[0]) or 2**16
    first = int(descriptor[1])
    # Applying the LUT to its whole input domain yields its real output extremes (descriptors often overstate
    # the bit depth).
    out = apply_voi_lut(np.arange(first, first + entries, dtype=np.int64), ds, index=0, prefer_lut=True)
    return float(np.min(out)), float(np.max(out))


def _window_output_range(ds: Dataset) -> tuple[float, float]:
    """Output range of pydicom's ``apply_windowing`` (mirrors its y_min/y_max, PS3.3 C.11.2.1.2)."""
    if ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        y_min, y_max = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        y_min, y_max = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        y_min, y_max = y_min * float(slope) + float(intercept), y_max * float(slope) + float(intercept)
    return min(y_min, y_max), max(y_min, y_max)


def _percentile_window(values: np.ndarray) -> np.ndarray:
    """Values between the 0.5th and 99.5th percentiles (NumPy's linear method) scaled to [0, 1], float64."""
    if values.dtype.kind in "ui" and values.dtype.itemsize <= 2 and values.size:
        return _percentile_window_integer(values)
    v = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(v, _PERCENTILE_WINDOW)
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, dtype=np.float64)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


def _percentile_window_integer(values: np.ndarray) -> np.ndarray:
    """:func:`_percentile_window` of 8- or 16-bit integers, exactly (tests compare it with NumPy's): the
    order statistics from a histogram instead of two partitions of a float64 copy, and the window applied
    as a lookup table over the values present instead of arithmetic per pixel (3.5 -> 0.8 ms for a
    512 x 512 image, which every study decodes twice: for the models and for the case page)."""
    flat = values.ravel()
    low, high = int(flat.min()), int(flat.max())
    if low == high:
        return np.zeros(values.shape, dtype=np.float64)
    offsets = flat.astype(np.intp) - low if low else flat
    counts = np.bincount(offsets, minlength=high - low + 1)
    below_or_at = np.cumsum(counts)
    n = flat.size
    # numpy.percentile's linear method: virtual index (n - 1) q, its neighbours, then _lerp
    virtual = (n - 1) * np.true_divide(np.asarray(_PERCENTILE_WINDOW, dtype=np.float64), 100)
    previous = np.floor(virtual)
    gamma = virtual - previous
    before = previous.astype(np.intp)
    after = np.minimum(before + 1, n - 1)
    a = np.searchsorted(below_or_at, before, side="right").astype(np.float64) + low
    b = np.searchsorted(below_or_at, after, side="right").astype(np.float64) + low
    diff = b - a
    window = a + diff * gamma
    window = np.where(gamma >= 0.5, b - diff * (1 - gamma), window)
    lo, hi = float(window[0]), float(window[1])
    if hi <= lo:
        lo, hi = float(low), float(high)
    levels = np.arange(low, high + 1, dtype=np.float64)
    table = np.clip((levels - lo) / (hi - lo), 0.0, 1.0)
    return table[offsets].reshape(values.shape)
