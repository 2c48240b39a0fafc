from __future__ import annotations

import numpy as np
import pytest

from inference.gates.rules import GateBounds, check_consistency, is_colour, measure
from inference.preprocess import load_dicom_image, load_image_file
from tests.inference.conftest import DATA_DIR, shared_dicom


@pytest.fixture(scope="module")
def fundus() -> np.ndarray:
    return load_dicom_image(shared_dicom("sc_fundus_j2k.dcm"))


@pytest.fixture(scope="module")
def chest() -> np.ndarray:
    return load_dicom_image(shared_dicom("cr_chest_jpegls.dcm"))


def test_real_images_pass_their_own_kind(fundus: np.ndarray, chest: np.ndarray) -> None:
    assert check_consistency(fundus, "fundus") is None
    assert check_consistency(chest, "chest") is None
    assert check_consistency(load_dicom_image(shared_dicom("dx_chest_small.dcm")), "chest") is None


def test_fundus_rejected_by_chest_gate(fundus: np.ndarray) -> None:
    reason = check_consistency(fundus, "chest")
    assert reason is not None and reason.startswith("colour photograph, not a radiograph")


def test_chest_rejected_by_fundus_gate(chest: np.ndarray) -> None:
    reason = check_consistency(chest, "fundus")
    assert reason is not None and reason.startswith("grayscale image, not a colour fundus photograph")
    # Gray stored as RGB is still gray.
    assert check_consistency(np.repeat(chest[..., None], 3, axis=2), "fundus") == reason


def test_training_images_pass_their_own_kind() -> None:
    for path in sorted((DATA_DIR / "fundus-glaucoma" / "images" / "normal").glob("*.jpg"))[:3]:
        assert check_consistency(load_image_file(path), "fundus") is None, path.name
    for path in sorted((DATA_DIR / "chest-xray-pneumonia" / "images" / "normal").glob("*.jpeg"))[:3]:
        img = load_image_file(path)  # stored as 3-channel JPEG, gray content
        assert not is_colour(img)
        assert check_consistency(img, "chest") is None, path.name


@pytest.mark.parametrize("kind", ["chest", "fundus"])
def test_blank_images_rejected(kind: str) -> None:
    blank = np.full((200, 200, 3), 0.4, np.float32) + np.random.default_rng(1).normal(0, 0.005, (200, 200, 3))
    reason = check_consistency(blank.astype(np.float32), kind)
    assert reason is not None and reason.startswith("blank image")


def test_chest_aspect_ratio_bound(chest: np.ndarray) -> None:
    strip = chest[: min(chest.shape[0], 3 * 600), :600]
    assert measure(strip).aspect > 2.5
    reason = check_consistency(strip, "chest")
    assert reason is not None and reason.startswith("aspect ratio 1:")
    assert check_consistency(chest[:1000, :450], "chest") is None  # 1:2.2 is fine


def test_bounds_from_mapping() -> None:
    assert GateBounds.from_mapping(None) == GateBounds()
    assert GateBounds.from_mapping({"max_aspect": 3}).max_aspect == 3.0
    with pytest.raises(ValueError, match="unknown gate parameter"):
        GateBounds.from_mapping({"ssim": 0.5})


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown modality kind"):
        check_consistency(np.random.default_rng(0).random((10, 10)), "knee")
