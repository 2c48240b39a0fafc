"""The free-space reserve with `gateway serve` on a real 20 MiB tmpfs: C-STORE gets 0xA700 and STOW-RS 507
before the disk fills, nothing is half written, and both store again as soon as space frees."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests import factories as f
from tests.api.conftest import STOW_TYPE, ApiServer, api_server, multipart, part10
from tests.mounts import fill, free_bytes, tmpfs
from tests.peers import send_file

pytestmark = [pytest.mark.e2e]

RESERVE = 8 << 20
OUT_OF_RESOURCES = 0xA700


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ApiServer]:
    with (
        tmpfs(tmp_path / "volume", 20 << 20) as volume,
        api_server(
            volume,
            DATABASE_URL=f"sqlite:///{tmp_path / 'gateway.sqlite3'}",  # the database lives elsewhere
            STORAGE__RESERVE_BYTES=str(RESERVE),
        ) as s,
    ):
        yield s


def _stow(server: ApiServer, ds: pydicom.Dataset) -> httpx.Response:
    return httpx.post(
        f"{server.url}/dicomweb/studies",
        content=multipart([part10(ds)]),
        headers={**server.headers, "Content-Type": STOW_TYPE},
        timeout=60,
    )


def _nothing_half_written(server: ApiServer) -> None:
    storage = server.data_dir / "storage"
    assert list((storage / "tmp").iterdir()) == []
    assert list(storage.glob("instances/**/*.dcm")) == []
    assert httpx.get(f"{server.url}/api/studies", headers=server.headers, timeout=30).json() == []


def test_reserve_refuses_then_resumes(server: ApiServer, tmp_path: Path) -> None:
    study = generate_uid()
    ds = f.chest_radiograph(study_uid=study)
    path = f.save(ds, tmp_path / "cstore.dcm")
    size = path.stat().st_size
    volume = server.data_dir.parent

    # Less than one instance above the reserve: refused before anything is written.
    filler = fill(volume, leave=RESERVE + size // 2)
    assert send_file(server.dicom_port, path) == OUT_OF_RESOURCES
    rsp = _stow(server, f.chest_radiograph(study_uid=study))
    assert rsp.status_code == 507 and "reserve" in rsp.json()["detail"]
    _nothing_half_written(server)

    # Room to receive one instance but not to store it next to its spooled copy: the part fails with 0xA700.
    filler.unlink()
    filler = fill(volume, leave=RESERVE + size * 3 // 2)
    stowed = f.chest_radiograph(study_uid=study)
    rsp = _stow(server, stowed)
    assert rsp.status_code == 507
    [failed] = pydicom.Dataset.from_json(rsp.json()).FailedSOPSequence
    assert (
        failed.FailureReason == OUT_OF_RESOURCES and failed.ReferencedSOPInstanceUID == stowed.SOPInstanceUID
    )
    _nothing_half_written(server)
    assert free_bytes(volume) >= RESERVE

    # Space frees: both paths store again, without a restart.
    filler.unlink()
    assert send_file(server.dicom_port, path) == 0x0000
    assert _stow(server, stowed).status_code == 200
    instances = httpx.get(f"{server.url}/api/studies/{study}", headers=server.headers, timeout=30).json()[
        "series"
    ]
    assert sorted(i["sop_instance_uid"] for s in instances for i in s["instances"]) == sorted(
        [str(ds.SOPInstanceUID), str(stowed.SOPInstanceUID)]
    )
    assert list((server.data_dir / "storage" / "tmp").iterdir()) == []
