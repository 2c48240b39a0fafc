"""Hostile datasets over STOW-RS get the failure reason C-STORE answers with (core.ingest.validate_instance),
inside a request whose good parts are stored, and the server neither grows nor stops answering."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from tests import factories as f
from tests import hostile as h
from tests.api.conftest import STOW_TYPE, ApiServer, api_server, multipart, part10

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with api_server(tmp_path_factory.mktemp("stow-hostile")) as s:
        yield s


def _peak_rss(server: ApiServer) -> int:
    """The server's peak resident memory so far (VmHWM, bytes)."""
    for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM line")


def _file(ds: pydicom.Dataset, body: bytes, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    return h.part10(
        body,
        sop_class=str(ds.SOPClassUID),
        sop_instance=str(ds.SOPInstanceUID),
        transfer_syntax=transfer_syntax,
    )


def test_hostile_parts_get_the_c_store_reasons(server: ApiServer, tmp_path: Path) -> None:
    good = f.chest_radiograph(study_uid=generate_uid())
    bomb_ds = f.chest_radiograph()
    deflate_bomb = _file(
        bomb_ds, h.deflate_bomb(bomb_ds, 1 << 30), transfer_syntax=DeflatedExplicitVRLittleEndian
    )
    nested_ds = f.chest_radiograph()
    nested = _file(
        nested_ds,
        h.splice(nested_ds, h.PROCEDURE_CODE_SEQUENCE, h.nested_sequence(300, undefined_length=False)),
    )
    j2k_bomb, j2k_liar = h.j2k_bomb(), h.j2k_bomb(header_rows=256)
    expected = {
        str(pydicom.dcmread(h.NEST_300, stop_before_pixels=True).SOPInstanceUID): 0xC000,
        str(nested_ds.SOPInstanceUID): 0xC000,
        str(bomb_ds.SOPInstanceUID): 0xA700,
        str(j2k_bomb.SOPInstanceUID): 0xC000,
        str(j2k_liar.SOPInstanceUID): 0xA900,
    }
    parts = [
        part10(good),
        h.NEST_300.read_bytes(),
        nested,
        deflate_bomb,
        part10(j2k_bomb),
        part10(j2k_liar),
        h.RLE_PANIC.read_bytes(),  # nothing short of decoding shows its damage: stored, the worker copes
    ]
    peak_before = _peak_rss(server)
    rsp = httpx.post(
        f"{server.url}/dicomweb/studies",
        content=multipart(parts),
        headers={**server.headers, "Content-Type": STOW_TYPE},
        timeout=120,
    )
    grown = _peak_rss(server) - peak_before
    assert rsp.status_code == 202, rsp.text
    result = pydicom.Dataset.from_json(rsp.json())
    stored = {str(i.ReferencedSOPInstanceUID) for i in result.ReferencedSOPSequence}
    assert stored == {
        str(good.SOPInstanceUID),
        str(pydicom.dcmread(h.RLE_PANIC, stop_before_pixels=True).SOPInstanceUID),
    }
    assert {str(i.ReferencedSOPInstanceUID): i.FailureReason for i in result.FailedSOPSequence} == expected
    assert grown < 200 << 20, f"server RSS grew by {grown >> 20} MiB"  # the bomb is counted, never held
    assert httpx.get(f"{server.url}/healthz", timeout=30).status_code == 200
