from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file as _get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.preprocess import (
    UnreadableImage,
    _percentile_window,
    iter_frames,
    load_any,
    load_dicom_image,
    load_image_file,
    to_model_input,
)
from tests.inference.conftest import DATA_DIR, shared_dicom


def get_testdata_file(name: str) -> str:
    """A sample shipped inside the pydicom wheel (never downloaded)."""
    path = _get_testdata_file(name, download=False)
    assert isinstance(path, str), name
    return path


def _unit(img: np.ndarray) -> None:
    assert img.dtype == np.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert float(img.max()) - float(img.min()) > 0.5  # the window spreads the image over the range


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("cr_chest_jpegls.dcm", (1955, 1841)),  # JPEG-LS, 15-bit, MONOCHROME1
        ("dx_chest_small.dcm", (169, 211)),  # native, MONOCHROME1 + Presentation LUT Shape INVERSE
        ("cr_hip_rle.dcm", (2140, 1760)),  # RLE, MONOCHROME2
    ],
)
def test_grayscale_files_decode_to_unit_range(name: str, shape: tuple[int, int]) -> None:
    img = load_dicom_image(shared_dicom(name))
    assert img.shape == shape
    _unit(img)


@pytest.mark.parametrize("name", ["cr_chest_jpegls.dcm", "dx_chest_small.dcm"])
def test_monochrome1_is_inverted_once(name: str) -> None:
    ds = pydicom.dcmread(shared_dicom(name))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    img = load_dicom_image(ds)
    # Stored values are dark for bone, ours bright for bone: strongly anti-correlated with the raw data.
    assert _correlation(img, ds.pixel_array) < -0.95


def test_monochrome2_is_not_inverted() -> None:
    ds = pydicom.dcmread(shared_dicom("cr_hip_rle.dcm"))
    assert _correlation(load_dicom_image(ds), ds.pixel_array) > 0.95


def test_chest_mediastinum_brighter_than_lungs() -> None:
    img = load_dicom_image(shared_dicom("cr_chest_jpegls.dcm"))
    h, w = img.shape
    rows = slice(int(0.3 * h), int(0.55 * h))
    mediastinum = img[rows, int(0.45 * w) : int(0.55 * w)].mean()
    lungs = (
        img[rows, int(0.2 * w) : int(0.35 * w)].mean() + img[rows, int(0.65 * w) : int(0.8 * w)].mean()
    ) / 2
    assert mediastinum > lungs + 0.05


def test_fundus_j2k_ybr_ict_comes_out_reddish_rgb() -> None:
    ds = pydicom.dcmread(shared_dicom("sc_fundus_j2k.dcm"))
    assert ds.PhotometricInterpretation == "YBR_ICT"
    img = load_dicom_image(ds)
    assert img.shape == (1868, 2226, 3)
    _unit(img)
    r, g, b = img.reshape(-1, 3).mean(axis=0)
    assert r > g > b


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # JPEG baseline, YBR_FULL_422
        "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
        "SC_ybr_full_422_uncompressed.dcm",  # native YBR_FULL_422
        "SC_rgb_rle_16bit.dcm",  # RLE RGB, 16 bits
    ],
)
def test_colour_test_files_converted_exactly_once(name: str) -> None:
    img = load_dicom_image(get_testdata_file(name))
    assert img.shape == (100, 100, 3)
    # Rows 0-9 of these pydicom samples are pure red, 20-29 pure green, 40-49 pure blue.
    np.testing.assert_allclose(img[5, 50], [1, 0, 0], atol=0.03)
    np.testing.assert_allclose(img[25, 50], [0, 1, 0], atol=0.03)
    np.testing.assert_allclose(img[45, 50], [0, 0, 1], atol=0.03)


def test_multiframe_first_frame_and_iter_frames() -> None:
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    frames = list(iter_frames(path))
    assert len(frames) == 2
    np.testing.assert_array_equal(load_dicom_image(path), frames[0])
    np.testing.assert_array_equal(load_dicom_image(path, frame=1), frames[1])
    with pytest.raises(UnreadableImage, match="out of range"):
        load_dicom_image(path, frame=2)


def _gray_dataset(pixels: np.ndarray, **elements: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def test_window_and_rescale_applied() -> None:
    pixels = np.tile(np.arange(0, 4000, 40, dtype=np.uint16), (10, 1))
    # Rescale to -1000..2960, window 0..1000: everything below 1000 stored goes black.
    ds = _gray_dataset(pixels, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=500, WindowWidth=1000)
    img = load_dicom_image(ds)
    assert img[0, 0] == 0.0 and img[0, -1] == 1.0
    stored_1500 = np.argmin(np.abs(pixels[0].astype(int) - 1500))  # value 500 after rescale: mid-window
    assert img[0, stored_1500] == pytest.approx(0.5, abs=0.03)


def test_no_voi_uses_percentile_window() -> None:
    pixels = np.tile(np.linspace(100, 900, 200).astype(np.uint16), (20, 1))
    img = load_dicom_image(_gray_dataset(pixels))
    assert img.min() == 0.0 and img.max() == 1.0
    assert img.dtype == np.float32


def _numpy_percentile_window(values: np.ndarray) -> np.ndarray:
    """The window as numpy.percentile draws it, on a float64 copy: what the integer path must equal."""
    v = values.astype(np.float64)
    lo, hi = np.percentile(v, (0.5, 99.5))
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape)
    return np.clip((v - lo) / (hi - lo), 0.0, 1.0)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
def test_integer_percentile_window_equals_numpy_bit_for_bit(dtype: type) -> None:
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    cases: list[np.ndarray] = [np.full((3, 5), info.min, dtype=dtype), np.full((9, 2), info.max, dtype=dtype)]
    for _ in range(400):
        shape = (int(rng.integers(1, 60)), int(rng.integers(1, 60)))
        low = int(rng.integers(info.min, info.max))
        high = int(rng.integers(low, info.max + 1))
        cases.append(rng.integers(low, high, shape, endpoint=True).astype(dtype))
    cases.append((np.tile(np.linspace(0, 4095, 512), (512, 1)) * rng.random((512, 512))).astype(dtype))
    for values in cases:
        got = _percentile_window(values)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, _numpy_percentile_window(values))


def test_monochrome2_with_inverse_presentation_lut_is_inverted() -> None:
    pixels = np.tile(np.linspace(100, 900, 200).astype(np.uint16), (20, 1))
    img = load_dicom_image(_gray_dataset(pixels, PresentationLUTShape="INVERSE"))
    assert img[0, 0] == 1.0 and img[0, -1] == 0.0


def test_dataset_without_pixels_is_unreadable() -> None:
    ds = pydicom.dcmread(shared_dicom("dx_chest_small.dcm"))
    del ds.PixelData
    with pytest.raises(UnreadableImage, match="no pixel data"):
        load_dicom_image(ds)


def test_corrupt_pixels_are_unreadable(tmp_path: Path) -> None:
    ds = pydicom.dcmread(shared_dicom("cr_hip_rle.dcm"))
    ds.PixelData = ds.PixelData[:200]
    with pytest.raises(UnreadableImage) as info:
        load_dicom_image(ds)
    assert isinstance(info.value, ValueError)


def test_not_dicom_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(UnreadableImage):
        load_any(path)
    with pytest.raises(UnreadableImage):
        load_dicom_image(path)


def test_load_image_file_gray_stays_2d_and_colour_is_rgb(tmp_path: Path) -> None:
    gray = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    img = load_image_file(tmp_path / "gray.png")
    assert img.shape == (8, 256) and img.dtype == np.float32 and img.max() == 1.0

    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255  # red in RGB order
    cv2.imwrite(str(tmp_path / "red.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(load_image_file(tmp_path / "red.png")[0, 0], [1, 0, 0])


def test_load_image_file_real_training_images() -> None:
    fundus = next((DATA_DIR / "fundus-glaucoma" / "images" / "glaucoma").glob("*.jpg"))
    img = load_image_file(fundus)
    assert img.ndim == 3 and img.shape[2] == 3
    r, g, b = img.reshape(-1, 3).mean(axis=0)
    assert r > g > b
    chest = next((DATA_DIR / "covid19-radiography" / "images" / "covid19").glob("*.jpg"))
    assert load_image_file(chest).ndim == 2


def test_load_any_sniffs_dicom_without_suffix(tmp_path: Path) -> None:
    target = tmp_path / "IM0001"
    shutil.copy(shared_dicom("dx_chest_small.dcm"), target)
    np.testing.assert_array_equal(load_any(target), load_dicom_image(shared_dicom("dx_chest_small.dcm")))
    cv2.imwrite(str(tmp_path / "x.png"), np.full((4, 4), 128, np.uint8))
    assert load_any(tmp_path / "x.png").shape == (4, 4)


@pytest.mark.parametrize(
    ("shape", "channels"), [((300, 200), 1), ((300, 200), 3), ((50, 80, 3), 1), ((50, 80, 3), 3)]
)
def test_to_model_input(shape: tuple[int, ...], channels: int) -> None:
    img = np.random.default_rng(0).random(shape, dtype=np.float32)
    x = to_model_input(img, 64, channels)
    assert x.shape == (64, 64, channels) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_to_model_input_gray_to_rgb_replicates_channels() -> None:
    x = to_model_input(np.full((10, 10), 0.25, np.float32), 8, 3)
    np.testing.assert_allclose(x, 0.25, atol=1e-6)


def _pydicom_window(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The reference: pydicom's ``apply_voi_lut`` scaled by its output range (the former path)."""
    from pydicom.pixels import apply_voi_lut

    from inference.preprocess import _window_output_range

    lo, hi = _window_output_range(ds)
    return np.clip((apply_voi_lut(values, ds, index=0).astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


@pytest.mark.parametrize(
    ("center", "width", "slope", "intercept", "function"),
    [
        (2048, 4096, 1, 0, None),
        (40, 400, 1, -1024, "LINEAR"),
        ([300, 40], [1500, 400], 1, -1024, None),  # several windows: the first
        (1000.5, 2.0, 0.5, 10, "LINEAR"),
        (-3.25e4, 7777, 2, 0, None),
    ],
)
def test_linear_window_matches_pydicom(
    center: object, width: object, slope: float, intercept: float, function: str | None
) -> None:
    """The float32 fast path for LINEAR windows gives pydicom's result (within float32 rounding)."""
    from pydicom.pixels import apply_modality_lut

    from inference.preprocess import _linear_window, _voi_window

    rng = np.random.default_rng(7)
    ds = Dataset()
    ds.BitsStored, ds.PixelRepresentation, ds.PhotometricInterpretation = 16, 1, "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth = center, width
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if function:
        ds.VOILUTFunction = function
    values = apply_modality_lut(rng.integers(-32768, 32767, (300, 200), dtype=np.int16), ds)
    fast = _linear_window(values, ds)
    assert fast is not None and fast.dtype == np.float32
    assert np.abs(fast - _pydicom_window(values, ds)).max() < 2e-6
    voi = _voi_window(values, ds)
    assert voi is not None and np.array_equal(voi, fast)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_other_window_functions_keep_pydicom(function: str) -> None:
    from inference.preprocess import _linear_window, _voi_window

    ds = Dataset()
    ds.BitsStored, ds.PixelRepresentation, ds.PhotometricInterpretation = 12, 0, "MONOCHROME2"
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2048, 4096, function
    values = np.arange(4096, dtype=np.float64).reshape(64, 64)
    assert _linear_window(values, ds) is None
    voi = _voi_window(values, ds)
    assert voi is not None and np.abs(voi - _pydicom_window(values, ds)).max() < 1e-9


def test_real_radiographs_window_as_with_pydicom() -> None:
    """The vendor chest and hip files with their own windows: the image the models get is unchanged."""
    from pydicom.pixels import apply_modality_lut

    from inference.preprocess import _voi_window

    for name in ("cr_chest_jpegls.dcm", "dx_chest_small.dcm", "cr_hip_rle.dcm"):  # each has one window
        ds = pydicom.dcmread(shared_dicom(name))
        values = apply_modality_lut(ds.pixel_array, ds)
        voi = _voi_window(values, ds)
        assert voi is not None, name
        assert np.abs(voi - _pydicom_window(values, ds)).max() < 2e-6, name
