"""The decode path with hostile input: nothing is decoded beyond the budget, and whatever a codec raises, a
Rust panic (BaseException) included, makes that image unreadable without touching the others."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from core.domain import InstanceRef
from core.settings import IngestSettings
from inference.model import run_model
from inference.preprocess import UnreadableImage, iter_frames, load_dicom_image
from inference.registry import ModelRegistry
from tests import factories as f
from tests import hostile as h
from tests.inference.conftest import shared_dicom
from tests.peers import REPO


def _ref(path: Path) -> InstanceRef:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID, path)


def test_rle_panic_regression_file_is_unreadable_not_a_panic() -> None:
    # The codec itself still panics on this file, with a BaseException that passes `except Exception` ...
    with pytest.raises(BaseException) as raw:
        _ = pydicom.dcmread(h.RLE_PANIC).pixel_array
    assert type(raw.value).__name__ == "PanicException" and not isinstance(raw.value, Exception)
    # ... which the decode path reports as an unreadable image.
    with pytest.raises(UnreadableImage, match="PanicException"):
        load_dicom_image(h.RLE_PANIC)
    with pytest.raises(UnreadableImage, match="PanicException"):
        next(iter_frames(h.RLE_PANIC))


def test_run_model_reports_the_others_beside_a_panicking_image(registry: ModelRegistry) -> None:
    model = registry.get("pneumonia")
    assert model is not None
    good = _ref(shared_dicom("dx_chest_small.dcm"))
    bad, other = run_model(model, [_ref(h.RLE_PANIC), good])
    assert not bad.assessable and bad.findings == ()
    assert bad.reason is not None and bad.reason.startswith("not assessable: unreadable image: cannot decode")
    assert "PanicException" in bad.reason
    assert other.assessable and other.findings[0].name == "pneumonia"


def test_budget_from_the_header_is_checked_before_decoding(tmp_path: Path) -> None:
    path = f.save(f.chest_radiograph(), tmp_path / "chest.dcm")  # 256 x 256
    assert load_dicom_image(path).shape == (256, 256)
    with pytest.raises(UnreadableImage, match="65536 pixels exceed the limit of 65535"):
        load_dicom_image(path, limits=IngestSettings(max_pixels=65535))
    with pytest.raises(UnreadableImage, match="131072 decoded pixel bytes exceed"):
        list(iter_frames(path, limits=IngestSettings(max_decoded_bytes=131071)))


def test_codestream_contradicting_the_header_is_not_decoded(tmp_path: Path) -> None:
    path = f.save(f.chest_radiograph(), tmp_path / "chest.dcm", "jpeg-ls")
    liar = pydicom.dcmread(path)
    liar.Rows = liar.Columns = 128  # the codestream still says 256 x 256: the decoder would write past
    liar.save_as(path)
    with pytest.raises(UnreadableImage, match="codestream declares 256 x 256"):
        load_dicom_image(path)


_DECODE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from inference.preprocess import UnreadableImage, load_dicom_image
try:
    load_dicom_image(sys.argv[1])
except UnreadableImage as exc:
    print("unreadable:", exc)
# VmHWM, not ru_maxrss: the latter keeps the peak of the pytest process this one was forked from
print("peak", next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


@pytest.mark.parametrize("header_rows", [24_000, 256], ids=["bomb-in-header", "bomb-in-codestream-only"])
def test_jpeg2000_bomb_stored_before_the_fix_never_grows_the_worker(tmp_path: Path, header_rows: int) -> None:
    """A file that reached storage some other way (before this check existed): the worker refuses it
    from its headers; decoding it would allocate gigabytes (run under an address-space limit to be sure)."""
    path = h.save_encapsulated(h.j2k_bomb(header_rows=header_rows), tmp_path / "bomb.dcm")
    limit = 3 << 30
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _DECODE.format(limit=limit), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    expected = "exceed the limit" if header_rows == 24_000 else "codestream declares 24000 x 24000"
    assert "unreadable:" in result.stdout and expected in result.stdout, result.stdout
    peak_kib = int(result.stdout.split("peak")[-1])
    assert peak_kib < 1 << 20, f"peak RSS {peak_kib >> 10} MiB"  # nothing near the 1.1 GB the codestream asks


def test_decoding_within_the_budget_still_works() -> None:
    image = load_dicom_image(shared_dicom("cr_hip_rle.dcm"))  # the RLE file the panic file was made from
    assert image.shape == (2140, 1760) and 0.0 <= float(image.min()) < float(image.max()) <= 1.0
