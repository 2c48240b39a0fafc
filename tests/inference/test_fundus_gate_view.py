"""The glaucoma gate's SSIM view 2 (the field of view at one exposure) and the camera variations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.gates.fundus import FundusGate, field_view, ssim, ssim_view
from inference.preprocess import load_image_file
from tests.inference.conftest import DATA_DIR
from training.camera import RANGES, VARIATIONS, brightness, off_centre, random_camera

PHOTOS = sorted((DATA_DIR / "fundus-glaucoma" / "images" / "normal").glob("*.jpg"))[:4]


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [load_image_file(p) for p in PHOTOS]


def _frame_3_2(image: np.ndarray) -> np.ndarray:
    """The photograph placed off-centre in a wider black 3:2 frame, as another camera records it."""
    h, w = image.shape[:2]
    frame = np.zeros((h, w * 3 // 2, 3), dtype=np.float32)
    frame[:, w // 8 : w // 8 + w] = image
    return frame


def _shifted_in_frame(image: np.ndarray) -> np.ndarray:
    """The whole field shifted towards a corner of a larger black frame (nothing of it cut off)."""
    h, w = image.shape[:2]
    frame = np.zeros((h * 3 // 2, w * 3 // 2, 3), dtype=np.float32)
    frame[h // 2 - 20 : h // 2 - 20 + h, 20 : 20 + w] = image
    return frame


def test_field_view_ignores_framing_shift_and_exposure(photos: list[np.ndarray]) -> None:
    rng = np.random.default_rng(0)
    for image in photos:
        reference = field_view(image, "full")
        for changed in (
            _frame_3_2(image),
            _shifted_in_frame(image),
            brightness(image, 0.6, rng),
            brightness(image, 1.4, rng),
        ):
            assert ssim(field_view(changed, "full"), reference) > 0.9
        # view 1, the whole frame as it is, is what refused such photographs
        assert ssim(ssim_view(_frame_3_2(image), "full", 1), ssim_view(image, "full", 1)) < 0.8
        # a field cut by the frame's edge loses part of itself: still closer than in view 1
        cut = off_centre(image, 0.15, rng)
        assert ssim(field_view(cut, "full"), reference) > ssim(ssim_view(cut, "full", 1), ssim_view(image))


def test_field_view_of_a_borderless_photograph_gets_a_round_edge(photos: list[np.ndarray]) -> None:
    from training.camera import field_of_view

    zoomed = field_of_view(photos[0], 0.65, np.random.default_rng(0))
    view = field_view(zoomed, "full")
    assert view.shape == (64, 64) and view[0, 0] == 0 and view[32, 32] > 0
    lit = view[view > 0.02]
    assert lit.mean() == pytest.approx(0.35, abs=0.03)


def test_gate_file_keeps_its_view(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[2] / "inference" / "weights" / "glaucoma" / "fundus_gate.npz"
    gate = FundusGate.load(shipped)
    for view in (1, 2):
        out = FundusGate(gate.stats, gate.embedding, view).save(tmp_path / f"g{view}.npz")
        assert FundusGate.load(out).view == view
    bad = FundusGate(gate.stats, gate.embedding, 7).save(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="unknown SSIM view 7"):
        FundusGate.load(bad)


def test_random_camera_is_seeded_and_stays_in_range(photos: list[np.ndarray]) -> None:
    image = photos[0]
    a = random_camera(image, np.random.default_rng(5), apply=1.0)
    b = random_camera(image, np.random.default_rng(5), apply=1.0)
    assert np.array_equal(a, b) and a.dtype == np.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0 and not np.array_equal(a, image)
    assert set(RANGES) == set(VARIATIONS)
    assert np.array_equal(random_camera(image, np.random.default_rng(5), apply=0.0), image)
