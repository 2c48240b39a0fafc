"""Hostile datasets over C-STORE get the right status, nothing refused is stored, and the listener stays up.

One listener serves the whole module (on SQLite: these are about the dataset, not the database); each test
checks that what it sent left nothing behind, and the last one that the listener still stores and echoes.
"""

from __future__ import annotations

import re
import resource
import struct
import subprocess
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.db import make_engine, make_sessionmaker
from core.dimse import reactor_held
from core.migrate import upgrade
from core.settings import DicomSettings, Settings
from core.storage import Storage
from core.tables import Instance
from dicom_listener.server import Listener, serve
from tests import factories as f
from tests import hostile as h
from tests.peers import SHARED_DICOM, STORESCU_FLAGS, dcmtk, receiving_into, storescu

CANNOT_UNDERSTAND, MISMATCH, OUT_OF_RESOURCES = 0xC000, 0xA900, 0xA700


class Gateway:
    def __init__(self, listener: Listener, factory: sessionmaker[Session], storage: Storage) -> None:
        self.listener, self.factory, self.storage = listener, factory, storage

    @property
    def port(self) -> int:
        return self.listener.port

    def count(self) -> int:
        with self.factory() as s:
            return int(s.scalar(select(func.count(Instance.id))) or 0)


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("hostile")
    engine = make_engine(f"sqlite:///{root / 'gateway.sqlite3'}")
    upgrade(engine)
    storage = Storage(root / "storage")
    storage.prepare()
    factory = make_sessionmaker(engine)
    dicom = DicomSettings(host="127.0.0.1", port=0, acse_timeout=5, dimse_timeout=30, network_timeout=30)
    with receiving_into(storage):
        listener = serve(Settings(dicom=dicom), storage, factory)
        yield Gateway(listener, factory, storage)
        listener.shutdown()
    engine.dispose()


def store(port: int, path: Path) -> Dataset:
    """C-STORE the file's dataset bytes as they are (pynetdicom as SCU); returns the status dataset."""
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    meta = pydicom.filereader.read_file_meta_info(path)
    ae = AE(ae_title="PYNETDICOM")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
    assert assoc.is_established, "association rejected"
    try:
        with reactor_held(assoc):
            status = assoc.send_c_store(path)
        assert "Status" in status, "no C-STORE response"
        return status
    finally:
        assoc.release()


def dcmtk_store(port: int, path: Path) -> str:
    """C-STORE with dcmtk's storescu; returns the status it reports ("Success", "Error: CannotUnderstand")."""
    syntax = str(pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID)
    flag = STORESCU_FLAGS.get(syntax, "-x=")
    result = subprocess.run(
        [
            dcmtk("storescu"),
            "-v",
            flag,
            "-aet",
            "MODALITY",
            "-aec",
            "GATEWAY",
            "127.0.0.1",
            str(port),
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"Received Store Response \((.*)\)", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    return found.group(1)


def refused(gw: Gateway, path: Path, code: int, match: str = "") -> str:
    """Send ``path``; assert status ``code`` with ``match`` in the Error Comment and nothing stored."""
    before = gw.count()
    status = store(gw.port, path)
    comment = str(status.get("ErrorComment", ""))
    assert (status.Status, match.lower() in comment.lower()) == (code, True), comment
    assert gw.count() == before
    assert list(gw.storage.tmp_dir.iterdir()) == []
    return comment


# --- nesting ---------------------------------------------------------------------------------------------


def test_regression_nest300_is_refused_by_pynetdicom_and_dcmtk(gw: Gateway) -> None:
    refused(gw, h.NEST_300, CANNOT_UNDERSTAND, "nested deeper than 32")
    assert dcmtk_store(gw.port, h.NEST_300) == "Error: CannotUnderstand"
    assert gw.count() == 0


@pytest.mark.parametrize("depth", [33, 300, 10_000])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined-length", "undefined-length"])
def test_deep_sequences_are_refused(gw: Gateway, tmp_path: Path, depth: int, undefined: bool) -> None:
    ds = f.chest_radiograph()
    body = h.splice(ds, h.PROCEDURE_CODE_SEQUENCE, h.nested_sequence(depth, undefined_length=undefined))
    refused(gw, h.write(tmp_path / "nested.dcm", ds, body), CANNOT_UNDERSTAND, "nested deeper")


def test_sequences_up_to_the_limit_are_accepted(gw: Gateway, tmp_path: Path) -> None:
    ds = f.chest_radiograph()
    body = h.splice(ds, h.PROCEDURE_CODE_SEQUENCE, h.nested_sequence(32, undefined_length=True))
    before = gw.count()
    assert store(gw.port, h.write(tmp_path / "nested.dcm", ds, body)).Status == 0x0000
    assert gw.count() == before + 1


# --- bombs -----------------------------------------------------------------------------------------------


def test_deflate_bomb_is_refused_within_its_inflate_limit(gw: Gateway, tmp_path: Path) -> None:
    ds = f.chest_radiograph()
    bomb = h.deflate_bomb(ds, 1 << 30)  # 1 GiB of padding
    assert len(bomb) < 2 << 20
    path = h.write(tmp_path / "bomb.dcm", ds, bomb, transfer_syntax=DeflatedExplicitVRLittleEndian)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    before = gw.count()
    with ThreadPoolExecutor(4) as pool:  # four at once killed the listener (2.2 GB each)
        statuses = list(pool.map(lambda _: store(gw.port, path), range(4)))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - peak_before
    assert [s.Status for s in statuses] == [OUT_OF_RESOURCES] * 4
    assert all("inflates to more than" in s.ErrorComment for s in statuses)
    assert gw.count() == before
    # Each bomb is inflated a chunk at a time and counted, never held (pynetdicom's decoder held 1 GiB).
    assert grown < 100 << 20, f"peak memory grew by {grown >> 20} MiB"


def test_deflated_instance_within_limits_is_stored(gw: Gateway, tmp_path: Path) -> None:
    ds = f.chest_radiograph()
    path = h.write(tmp_path / "ok.dcm", ds, h.deflated(ds), transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert store(gw.port, path).Status == 0x0000


def test_corrupt_deflate_stream_is_refused(gw: Gateway, tmp_path: Path) -> None:
    ds = f.chest_radiograph()
    data = h.deflated(ds)
    path = h.write(
        tmp_path / "cut.dcm", ds, data[: len(data) // 2], transfer_syntax=DeflatedExplicitVRLittleEndian
    )
    refused(gw, path, CANNOT_UNDERSTAND, "deflated dataset")


def test_jpeg2000_bomb_is_refused_before_decoding(gw: Gateway, tmp_path: Path) -> None:
    bomb = h.j2k_bomb()  # 24,000 x 24,000 x 16 bit in the codestream and in the header
    path = h.save_encapsulated(bomb, tmp_path / "j2k.dcm")
    assert path.stat().st_size < 64 << 10
    refused(gw, path, CANNOT_UNDERSTAND, "exceed the limit")
    assert dcmtk_store(gw.port, path) == "Error: CannotUnderstand"


def test_jpeg2000_codestream_contradicting_the_header_is_refused(gw: Gateway, tmp_path: Path) -> None:
    liar = h.j2k_bomb(header_rows=256)  # the header says 256 x 256, the codestream 24,000 x 24,000
    refused(gw, h.save_encapsulated(liar, tmp_path / "j2k.dcm"), MISMATCH, "codestream declares 24000")


@pytest.mark.parametrize("syntax", ["jpeg-baseline", "jpeg-ls", "rle"])
def test_other_codestreams_contradicting_the_header_are_refused(
    gw: Gateway, tmp_path: Path, syntax: str
) -> None:
    ds = f.vl_photographic() if syntax == "jpeg-baseline" else f.chest_radiograph()
    path = f.save(ds, tmp_path / "in.dcm", syntax)
    liar = pydicom.dcmread(path)
    liar.Rows, liar.Columns = liar.Rows // 2, liar.Columns // 2  # codestream keeps the real size
    if syntax == "rle":
        liar.BitsAllocated, liar.BitsStored, liar.HighBit = 8, 8, 7  # RLE: segments per sample and byte
    liar.save_as(path)
    refused(gw, path, MISMATCH, "frame 1")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"Rows": 65535, "Columns": 65535, "NumberOfFrames": 2**31 - 1}, "exceed the limit"),
        ({"NumberOfFrames": "99999999999"}, "NumberOfFrames"),
        ({"NumberOfFrames": "-1"}, "NumberOfFrames"),
        ({"BitsAllocated": 0}, "BitsAllocated"),
        ({"SamplesPerPixel": 7}, "SamplesPerPixel"),
    ],
    ids=["rows-columns-frames-overflow", "absurd-frames", "negative-frames", "zero-bits", "seven-samples"],
)
def test_absurd_pixel_descriptions_are_refused(
    gw: Gateway, tmp_path: Path, changes: dict[str, object], match: str
) -> None:
    ds = f.chest_radiograph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
    refused(gw, h.write(tmp_path / "x.dcm", ds, h.encode(ds)), CANNOT_UNDERSTAND, match)


def test_element_flood_is_refused(gw: Gateway, tmp_path: Path) -> None:
    ds = f.chest_radiograph()
    del ds.PixelData
    flood = b"".join(
        struct.pack("<HH2sH", group, element, b"LO", 0)
        for group in range(0x0011, 0x0025, 2)
        for element in range(0x1000, 0x10000)
    )  # 614,400 empty private elements, 4.9 MB
    refused(
        gw, h.write(tmp_path / "flood.dcm", ds, h.splice(ds, 0x00110000, flood)), OUT_OF_RESOURCES, "elements"
    )


# --- headers the pipeline cannot read ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("missing", "match"),
    [
        ("Rows", "without Rows"),
        ("BitsAllocated", "without BitsAllocated"),
        ("PhotometricInterpretation", "(0028,0004)"),
        ("PixelRepresentation", "(0028,0103)"),
    ],
)
def test_image_without_its_pixel_description_is_refused(
    gw: Gateway, tmp_path: Path, missing: str, match: str
) -> None:
    ds = f.chest_radiograph()
    ds["PixelData"].VR = "OW"  # pydicom needs Bits Allocated to choose otherwise
    delattr(ds, missing)
    refused(gw, h.write(tmp_path / "x.dcm", ds, h.encode(ds)), CANNOT_UNDERSTAND, match)


def test_image_sop_class_without_pixel_data_is_refused(gw: Gateway, tmp_path: Path) -> None:
    ds = f.chest_radiograph()
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    refused(gw, h.write(tmp_path / "x.dcm", ds, h.encode(ds)), CANNOT_UNDERSTAND, "without pixel data")


def test_value_of_impossible_length_is_refused(gw: Gateway, tmp_path: Path) -> None:
    ds = f.chest_radiograph()
    odd = struct.pack("<HH2sH", 0x0018, 0x1164, b"US", 3) + b"\x01\x02\x03"  # 3 bytes of US: not a number
    refused(
        gw, h.write(tmp_path / "x.dcm", ds, h.splice(ds, 0x00181164, odd)), CANNOT_UNDERSTAND, "(0018,1164)"
    )


def test_unknown_value_representation_is_refused(gw: Gateway, tmp_path: Path) -> None:
    ds = f.chest_radiograph()
    bad = struct.pack("<HH2sH", 0x0018, 0x1000, b"QQ", 4) + b"ABCD"
    refused(
        gw, h.write(tmp_path / "x.dcm", ds, h.splice(ds, 0x00181000, bad)), CANNOT_UNDERSTAND, "(0018,1000)"
    )


def test_length_running_past_the_dataset_is_refused(gw: Gateway, tmp_path: Path) -> None:
    ds = f.chest_radiograph()
    cut = struct.pack("<HH2s2xL", 0x0008, 0x1032, b"SQ", 1 << 20) + struct.pack("<HHL", 0xFFFE, 0xE000, 0)
    refused(
        gw, h.write(tmp_path / "x.dcm", ds, h.splice(ds, 0x00081032, cut)), CANNOT_UNDERSTAND, "runs past"
    )


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("rule", list(h.BAD_UIDS))
@pytest.mark.parametrize(
    "field", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"]
)
def test_uid_grammar_violations_are_refused(gw: Gateway, tmp_path: Path, field: str, rule: str) -> None:
    ds = f.chest_radiograph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setattr(ds, field, h.BAD_UIDS[rule])
    if field == "SOPInstanceUID" and rule == "too-long":  # pynetdicom will not send it; dcmtk does
        path = h.write(tmp_path / "x.dcm", ds, h.encode(ds))
        before = gw.count()
        assert dcmtk_store(gw.port, path) == "Error: CannotUnderstand"
        assert gw.count() == before
        return
    if field == "SOPInstanceUID" and rule == "empty":  # no SCU sends an empty command UID
        data = h.part10(h.encode(ds), sop_class=str(ds.SOPClassUID), sop_instance=generate_uid())
        path = tmp_path / "x.dcm"
        path.write_bytes(data)
    else:  # the command carries the dataset's UID: the refusal is about the UID itself
        path = h.write(tmp_path / "x.dcm", ds, h.encode(ds))
    refused(gw, path, CANNOT_UNDERSTAND, "invalid")


# --- preamble ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preamble", [b"MZ\x90\x00\x03", b"\x7fELF\x02\x01\x01"], ids=["pe", "elf"])
def test_executable_preamble_never_reaches_storage(gw: Gateway, tmp_path: Path, preamble: bytes) -> None:
    ds = f.chest_radiograph()
    path = h.write(tmp_path / "x.dcm", ds, h.encode(ds), preamble=preamble)
    assert path.read_bytes()[:2] in (b"MZ", b"\x7fE")
    assert store(gw.port, path).Status == 0x0000
    with gw.factory() as s:
        stored = s.scalars(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID)).one()
    data = gw.storage.absolute(stored.path).read_bytes()
    assert data[:128] == bytes(128) and data[128:132] == b"DICM"
    assert pydicom.dcmread(gw.storage.absolute(stored.path)).SOPInstanceUID == ds.SOPInstanceUID


# --- still serving --------------------------------------------------------------------------------------


def test_listener_still_stores_and_echoes_after_all_that(gw: Gateway) -> None:
    before = gw.count()
    assert storescu(gw.port, SHARED_DICOM / "dx_chest_small.dcm").returncode == 0
    assert gw.count() == before + 1
    echo = subprocess.run(
        [dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1", str(gw.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert echo.returncode == 0, echo.stderr
