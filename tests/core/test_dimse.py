"""core.dimse.reactor_held against dcmtk's storescp: pynetdicom's requestor reactor can take the C-STORE
response a sender waits for; held, it never does.

The race needs a reactor that has just passed its checkpoint when a C-STORE goes out, and a sender that gets
to reading the response only after the reactor looked at the queue (a loaded host: 20 senders on 2 cores).
Here the reactor dozes 300 ms after each pass of its checkpoint and the sender starts reading 600 ms after
sending, so the race shows on every send rather than once in thousands."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from core.dimse import reactor_held
from tests.peers import storescp


class _SlowCheckpoint(threading.Event):
    """The reactor passes it and then dozes while its 'paused' flag still reads True."""

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        time.sleep(0.3)
        return passed


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.PatientID = "DIMSE-TEST"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _associate(port: int) -> Association:
    ae = AE(ae_title="SENDER")
    ae.acse_timeout = ae.network_timeout = 10
    ae.dimse_timeout = 2
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS")
    assert assoc.is_established
    return assoc


def _slow_down(assoc: Association) -> None:
    checkpoint = _SlowCheckpoint()
    checkpoint.set()
    assoc._reactor_checkpoint = checkpoint
    dimse = assoc.dimse
    get_msg = type(dimse).get_msg

    def late_get_msg(block: bool = False) -> object:
        if block:  # the sender, waiting for its response
            time.sleep(0.6)
        return get_msg(dimse, block)

    dimse.get_msg = late_get_msg  # type: ignore[method-assign,assignment]
    time.sleep(0.7)  # the reactor is on the slow checkpoint now


def test_unheld_reactor_takes_the_response(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The control: without the hold, the response arrives while the reactor dozes past its checkpoint,
    # it takes the message as an unexpected request and the sender waits out its DIMSE timeout.
    with storescp(tmp_path / "pacs") as port, caplog.at_level(logging.WARNING, logger="pynetdicom"):
        assoc = _associate(port)
        _slow_down(assoc)
        response = assoc.send_c_store(_dataset())
        assert "Status" not in response
        assert "Received unexpected C-STORE service message" in caplog.text
        assert len(list((tmp_path / "pacs").iterdir())) == 1  # the PACS did store it
        assoc.join(10)


def test_held_reactor_leaves_every_response_to_the_sender(tmp_path: Path) -> None:
    with storescp(tmp_path / "pacs") as port:
        assoc = _associate(port)
        sent = []
        for _ in range(5):
            _slow_down(assoc)
            ds = _dataset()
            with reactor_held(assoc):
                response = assoc.send_c_store(ds)
            assert int(response.Status) == 0x0000
            sent.append(ds.SOPInstanceUID)
        assoc.release()
        assoc.join(10)
        assert not assoc.is_alive()  # the reactor ran again and ended with the association
        received = sorted(p.name.split(".", 1)[1] for p in (tmp_path / "pacs").iterdir())
        assert received == sorted(sent)


def test_releases_and_aborts_inside_the_hold_end_the_association(tmp_path: Path) -> None:
    with storescp(tmp_path / "pacs") as port:
        for end in ("release", "abort"):
            assoc = _associate(port)
            with reactor_held(assoc):
                assert int(assoc.send_c_store(_dataset()).Status) == 0x0000
                getattr(assoc, end)()
            assoc.join(10)
            assert not assoc.is_alive(), end
            assert not assoc.is_established


def test_hold_on_an_ended_association_returns_at_once(tmp_path: Path) -> None:
    with storescp(tmp_path / "pacs") as port:
        assoc = _associate(port)
        assoc.release()
        assoc.join(10)
        started = time.monotonic()
        with reactor_held(assoc, timeout=10):
            pass
        assert time.monotonic() - started < 1.0
