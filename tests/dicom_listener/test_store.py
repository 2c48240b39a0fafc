"""The listener on a real socket, fed by dcmtk storescu and by pynetdicom as SCU."""

from __future__ import annotations

import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import DicomSettings, Settings, StorageSettings
from core.storage import DirectTempFile, Storage
from core.tables import Instance, Series, Study
from dicom_listener import server as server_module
from dicom_listener.server import Listener, serve
from tests import factories as f
from tests.dicom_listener.sockets import store_partially
from tests.peers import SHARED_DICOM, dcmtk, receiving_into, send_file, storescu, wait_for

REAL_FILES = sorted(SHARED_DICOM.glob("*.dcm"))


@pytest.fixture
def listener(storage: Storage, factory: sessionmaker[Session]) -> Iterator[Listener]:
    dicom = DicomSettings(
        host="127.0.0.1",
        port=0,
        allowed_calling_aes=["MODALITY", "PYNETDICOM"],
        acse_timeout=5,
        dimse_timeout=10,
        network_timeout=10,
    )
    with receiving_into(storage):
        server = serve(Settings(dicom=dicom), storage, factory)
        yield server
        server.shutdown()


def _count(factory: sessionmaker[Session]) -> int:
    with factory() as s:
        return int(s.scalar(select(func.count(Instance.id))) or 0)


@pytest.mark.parametrize("path", REAL_FILES, ids=[p.name for p in REAL_FILES])
def test_storescu_real_vendor_files_are_stored_intact(
    listener: Listener, factory: sessionmaker[Session], storage: Storage, path: Path
) -> None:
    result = storescu(listener.port, path)
    assert result.returncode == 0, result.stderr
    original = pydicom.dcmread(path)
    with factory() as s:
        inst = s.scalars(select(Instance).where(Instance.sop_instance_uid == original.SOPInstanceUID)).one()
        assert inst.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
        assert inst.calling_ae == "MODALITY"
        stored = pydicom.dcmread(storage.absolute(inst.path))
    # dcmtk pads odd-length pixel data (dx_chest_small.dcm has it) to even length, as the standard requires.
    assert stored.PixelData[: len(original.PixelData)] == original.PixelData
    assert stored.StudyInstanceUID == original.StudyInstanceUID


SYNTHETIC = {
    "op-8bit": lambda: f.ophthalmic_photo(),
    "op-16bit": lambda: f.ophthalmic_photo(bits=16),
    "vl-photographic": f.vl_photographic,
    "sc-single": f.secondary_capture_fundus,
    "sc-multiframe-true-colour": lambda: f.secondary_capture_fundus(multiframe=True),
    "dx-presentation": f.chest_radiograph,
    "dx-processing": lambda: f.chest_radiograph(sop_class=f.DX_PROCESSING),
    "cr": lambda: f.chest_radiograph(sop_class=f.CR, modality="CR"),
}
SYNTAXES = {
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "jpeg-baseline": "jpeg-baseline",
    "jpeg-extended": "jpeg-extended",
    "jpeg-lossless": "jpeg-lossless-sv1",
    "jpeg-ls": "jpeg-ls",
    "jpeg-ls-near": "jpeg-ls-near",
    "rle": "rle",
}


@pytest.mark.parametrize("kind", list(SYNTHETIC))
def test_sop_classes(listener: Listener, factory: sessionmaker[Session], tmp_path: Path, kind: str) -> None:
    path = f.save(SYNTHETIC[kind](), tmp_path / f"{kind}.dcm")
    result = storescu(listener.port, path)
    assert result.returncode == 0, result.stderr
    assert _count(factory) == 1


@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_transfer_syntaxes(
    listener: Listener, factory: sessionmaker[Session], storage: Storage, tmp_path: Path, syntax: str
) -> None:
    ds = f.vl_photographic() if syntax == "jpeg-baseline" else f.chest_radiograph()
    path = f.save(ds, tmp_path / "in.dcm", SYNTAXES[syntax])
    sent_ts = str(pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID)
    assert send_file(listener.port, path) == 0x0000
    with factory() as s:
        inst = s.scalars(select(Instance)).one()
    assert inst.transfer_syntax_uid == sent_ts
    stored = pydicom.dcmread(storage.absolute(inst.path))
    assert stored.pixel_array.shape == pydicom.dcmread(path).pixel_array.shape


def test_same_instance_twice_is_stored_once(
    listener: Listener, factory: sessionmaker[Session], storage: Storage
) -> None:
    path = SHARED_DICOM / "dx_chest_small.dcm"
    assert storescu(listener.port, path).returncode == 0
    with factory() as s:
        first = s.scalars(select(Instance)).one()
    mtime = storage.absolute(first.path).stat().st_mtime_ns
    assert storescu(listener.port, path).returncode == 0
    with factory() as s:
        assert s.scalar(select(func.count(Instance.id))) == 1
        assert s.scalar(select(func.count(Study.id))) == 1
    assert storage.absolute(first.path).stat().st_mtime_ns == mtime


@pytest.mark.parametrize("direct", [True, False], ids=["o-direct", "page-cache"])
def test_a_large_instance_is_stored_byte_for_byte_with_direct_writes_on_and_off(
    storage: Storage, factory: sessionmaker[Session], tmp_path: Path, direct: bool
) -> None:
    ds = f.chest_radiograph()
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1201, 1333, 16, 12, 11
    ds.PixelData = np.random.default_rng(7).integers(0, 4096, (1201, 1333), dtype=np.uint16).tobytes()
    path = f.save(ds, tmp_path / "large.dcm")  # 3.2 MB: several 1 MiB buffers and an unaligned tail
    config = Settings(
        dicom=DicomSettings(host="127.0.0.1", port=0, allowed_calling_aes=["MODALITY"]),
        storage=StorageSettings(direct_writes=direct),
    )
    made = DirectTempFile.made
    with receiving_into(storage):
        server = serve(config, storage, factory)
        try:
            assert storescu(server.port, path).returncode == 0
        finally:
            server.shutdown()
    assert server_module._direct_writes == direct and DirectTempFile.made - made == int(direct)
    with factory() as s:
        stored = storage.absolute(s.scalars(select(Instance)).one().path)
    assert pydicom.dcmread(stored) == pydicom.dcmread(path)
    assert (
        stored.stat().st_size
        == len(pydicom.dcmread(stored).PixelData) + stored.read_bytes().index(b"\xe0\x7f\x10\x00") + 12
    )  # nothing after the pixels: the padded tail was cut
    assert not list(storage.tmp_dir.iterdir())


def test_echo(listener: Listener) -> None:
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1", str(listener.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# --- bad input: each gets its status, and nothing already stored is lost -------------------------------


@pytest.fixture
def stored_before(listener: Listener, factory: sessionmaker[Session]) -> int:
    assert storescu(listener.port, SHARED_DICOM / "dx_chest_small.dcm").returncode == 0
    assert _count(factory) == 1
    return 1


def _assert_kept(factory: sessionmaker[Session], storage: Storage, n: int) -> None:
    with factory() as s:
        instances = list(s.scalars(select(Instance)))
    assert len(instances) == n
    for inst in instances:
        assert pydicom.dcmread(storage.absolute(inst.path)).SOPInstanceUID == inst.sop_instance_uid
    assert list(storage.tmp_dir.iterdir()) == []


def test_truncated_dataset_is_refused(
    listener: Listener, factory: sessionmaker[Session], storage: Storage, stored_before: int, tmp_path: Path
) -> None:
    good = f.save(f.chest_radiograph(), tmp_path / "good.dcm")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) // 2])
    assert send_file(listener.port, truncated) == 0xC000
    _assert_kept(factory, storage, stored_before)


def test_uid_mismatch_with_the_command_is_refused(
    listener: Listener, factory: sessionmaker[Session], storage: Storage, stored_before: int, tmp_path: Path
) -> None:
    ds = f.chest_radiograph()
    path = f.save(ds, tmp_path / "x.dcm")
    # The command's Affected SOP Instance UID comes from the file meta; the dataset says otherwise.
    meta_lie = pydicom.dcmread(path)
    meta_lie.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta_lie.save_as(path)
    assert send_file(listener.port, path) == 0xA900
    # SOP class differing from the command's (a CR dataset sent as DX).
    ds2 = f.chest_radiograph(sop_class=f.CR, modality="CR")
    path2 = f.save(ds2, tmp_path / "y.dcm")
    lie2 = pydicom.dcmread(path2)
    lie2.file_meta.MediaStorageSOPClassUID = UID(f.DX_PRESENTATION)
    lie2.save_as(path2)
    assert send_file(listener.port, path2) == 0xA900
    _assert_kept(factory, storage, stored_before)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("bad_uid", ["../../x", "1.2.3/../../../etc/passwd"])
def test_path_traversal_uid_is_refused(
    listener: Listener,
    factory: sessionmaker[Session],
    storage: Storage,
    stored_before: int,
    tmp_path: Path,
    bad_uid: str,
) -> None:
    for field in ("StudyInstanceUID", "SeriesInstanceUID"):
        ds = f.chest_radiograph()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom rightly warns about the invalid UI value
            setattr(ds, field, bad_uid)
            path = f.save(ds, tmp_path / f"{field}.dcm")
        assert send_file(listener.port, path) == 0xC000
    _assert_kept(factory, storage, stored_before)
    assert not any(p.name == "x" for p in storage.root.parent.rglob("x"))


def test_unsupported_sop_class_is_rejected(
    listener: Listener, factory: sessionmaker[Session], storage: Storage, stored_before: int, tmp_path: Path
) -> None:
    ds = f.chest_radiograph()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.826.0.1.3680043.9.9999.1")
    path = f.save(ds, tmp_path / "private.dcm")
    result = storescu(listener.port, path)
    assert result.returncode != 0
    assert "presentation context" in result.stderr.lower()
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context("1.2.826.0.1.3680043.9.9999.1")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="GATEWAY")
    assert not assoc.is_established  # its only context was refused: pynetdicom aborts
    _assert_kept(factory, storage, stored_before)


def test_disallowed_calling_ae_is_rejected(
    listener: Listener, factory: sessionmaker[Session], storage: Storage, stored_before: int
) -> None:
    result = storescu(listener.port, SHARED_DICOM / "cr_hip_rle.dcm", calling="INTRUDER")
    assert result.returncode != 0
    assert "rejected" in result.stderr.lower()
    _assert_kept(factory, storage, stored_before)


def test_disk_failure_answers_out_of_resources(
    listener: Listener, factory: sessionmaker[Session], storage: Storage, stored_before: int, tmp_path: Path
) -> None:
    path = f.save(f.chest_radiograph(), tmp_path / "x.dcm")
    instances = storage.root / "instances"
    instances.rename(storage.root / "kept")
    instances.write_bytes(b"")  # the instance folder is now a file: no instance can be stored (ENOTDIR)
    try:
        assert send_file(listener.port, path) == 0xA700
        assert list(storage.tmp_dir.iterdir()) == []  # the received file was removed
    finally:
        instances.unlink()
        (storage.root / "kept").rename(instances)
    _assert_kept(factory, storage, stored_before)
    assert send_file(listener.port, path) == 0x0000  # recovered
    _assert_kept(factory, storage, stored_before + 1)


def test_release_starts_the_quiet_period(listener: Listener, factory: sessionmaker[Session]) -> None:
    assert storescu(listener.port, SHARED_DICOM / "dx_chest_small.dcm").returncode == 0

    def released() -> Study | None:
        # The connection-closed event is handled just after storescu has seen the release.
        with factory() as s:
            study = s.scalars(select(Study)).one()
        return study if study.released_at is not None else None

    study = wait_for("the release to be recorded", released, timeout=10)
    assert study.released_at >= study.last_received_at
    with factory() as s:
        assert s.scalars(select(Series)).one().modality == "DX"


def test_received_file_becomes_the_instance_file(
    listener: Listener, factory: sessionmaker[Session], storage: Storage, tmp_path: Path
) -> None:
    """The dataset is received into a temp file in the storage volume, which is renamed into place: the
    stored file is the preamble, pynetdicom's file meta and exactly the bytes sent."""
    ds = f.chest_radiograph()
    path = f.save(ds, tmp_path / "x.dcm")
    assert send_file(listener.port, path) == 0x0000
    with factory() as s:
        stored = storage.absolute(s.scalars(select(Instance)).one().path)
    data, sent = stored.read_bytes(), path.read_bytes()
    assert data[:128] == bytes(128) and data[128:132] == b"DICM"
    dataset = sent[132 + 12 + int.from_bytes(sent[140:144], "little") :]  # after the sender's file meta
    assert data.endswith(dataset) and pydicom.dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
    assert oct(stored.stat().st_mode & 0o777) == "0o644"
    assert list(storage.tmp_dir.iterdir()) == []


def test_association_aborted_mid_dataset_leaves_no_temp_file(
    listener: Listener, storage: Storage, stored_before: int, factory: sessionmaker[Session]
) -> None:
    """A sender that dies halfway through a C-STORE: the part received is removed, nothing is stored."""
    sock = store_partially(listener.port, f.chest_radiograph())
    try:
        wait_for("the dataset to be received into a temp file", lambda: list(storage.tmp_dir.iterdir()), 10)
    finally:
        sock.close()  # no A-ABORT, no release: the peer is just gone
    wait_for("the partial file to be removed", lambda: not list(storage.tmp_dir.iterdir()), 10)
    _assert_kept(factory, storage, stored_before)
    assert send_file(listener.port, f.save(f.chest_radiograph(), storage.root / "y.dcm")) == 0x0000
