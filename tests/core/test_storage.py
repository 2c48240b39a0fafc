import errno
import os
from pathlib import Path

import pytest
from pydicom import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.ingest import InstanceMeta, InsufficientStorage, store_instance
from core.storage import DirectTempFile, InvalidUID, Storage
from core.tables import Instance
from tests import factories as f
from tests.mounts import fill, tmpfs


@pytest.mark.parametrize("uid", ["../../x", "1.2/../3", "1.2.840..1", "", "1." + "2" * 70, "abc", "1.2.03"])
def test_file_names_only_from_valid_uids(storage: Storage, uid: str) -> None:
    with pytest.raises(InvalidUID):
        storage.instance_path("1.2.3", "1.2.3.4", uid)
    with pytest.raises(InvalidUID):
        storage.instance_path(uid, "1.2.3.4", "1.2.3.4.5")


def test_durable_write_and_leftover_cleanup(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "s")
    storage.prepare()
    rel = storage.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    path = storage.write_bytes(rel, b"DICM-bytes")
    assert path.read_bytes() == b"DICM-bytes" and path.is_relative_to(storage.root)
    assert list(storage.tmp_dir.iterdir()) == []
    (storage.tmp_dir / ".incoming-crashed").write_bytes(b"half")
    assert Storage(tmp_path / "s").prepare() == 1
    assert list(storage.tmp_dir.iterdir()) == []
    assert path.read_bytes() == b"DICM-bytes"


@pytest.mark.parametrize("durable", [True, False])
def test_derived_files_skip_the_fsyncs_and_stay_atomic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    """Renditions (drawn again when missing) are written without fsync; instances and reports with."""
    storage = Storage(tmp_path / "s")
    storage.prepare()
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    rel = storage.rendition_path("1.2.3", "1.2.3.4", ".png")
    storage.write_bytes(rel, b"old")
    synced.clear()
    path = storage.write_bytes(rel, b"new", durable=durable)
    assert path.read_bytes() == b"new" and list(storage.tmp_dir.iterdir()) == []
    assert (len(synced) > 0) is durable


def test_absolute_refuses_escape(storage: Storage) -> None:
    with pytest.raises(InvalidUID):
        storage.absolute("../outside.dcm")


def _meta(ds: Dataset) -> InstanceMeta:
    return InstanceMeta.from_dataset(ds, str(ds.file_meta.TransferSyntaxUID))


def _count(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def test_reserve_refuses_before_writing_and_resumes_when_space_frees(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    ds = f.chest_radiograph()
    data = f.save(ds, tmp_path / "x.dcm").read_bytes()
    with tmpfs(tmp_path / "volume", 4 << 20) as volume:
        storage = Storage(volume / "storage", reserve_bytes=1 << 20)
        storage.prepare()
        filler = fill(volume, leave=(1 << 20) + len(data) // 2)  # the instance would cut into the reserve
        assert not storage.has_room(len(data))
        with pytest.raises(InsufficientStorage, match="reserve"):
            store_instance(storage, factory, _meta(ds), data, source="test")
        assert list(storage.tmp_dir.iterdir()) == [] and not list(volume.glob("storage/instances/**/*.dcm"))
        assert _count(factory) == 0
        filler.unlink()  # space frees: the next store succeeds, no restart, no state to reset
        stored = store_instance(storage, factory, _meta(ds), data, source="test")
        assert storage.absolute(stored.relative_path).read_bytes() == data and _count(factory) == 1


def test_disk_full_while_writing_leaves_no_partial_file(
    tmp_path: Path, factory: sessionmaker[Session]
) -> None:
    """has_room looks at the root's volume; a tiny tmpfs on tmp/ makes the write itself fail with ENOSPC."""
    storage = Storage(tmp_path / "storage")
    storage.prepare()
    ds = f.chest_radiograph()
    data = f.save(ds, tmp_path / "x.dcm").read_bytes()
    with tmpfs(storage.tmp_dir, 64 << 10):
        assert storage.has_room(len(data)) and len(data) > 64 << 10
        with pytest.raises(InsufficientStorage, match="full"):
            store_instance(storage, factory, _meta(ds), data, source="test")
        with pytest.raises(OSError) as err:
            storage.write_bytes("reports/1.2.3/1.2.3.4.dcm", data)
        assert err.value.errno == errno.ENOSPC
        assert list(storage.tmp_dir.iterdir()) == []
    assert not list(storage.root.glob("**/*.dcm")) and _count(factory) == 0


@pytest.mark.parametrize(
    "size", [0, 1, 4095, 4096, 4097, 256 << 10, (256 << 10) + 1, (1 << 20) - 1, 1 << 20, (3 << 20) + 12345]
)
def test_direct_temp_file_holds_exactly_what_was_written(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    received = DirectTempFile(tmp_path, ".incoming-", ".dcm")
    assert received._buffer is not None  # ext4 or xfs under tmp_path: O_DIRECT, not the fallback
    pieces = [data[i : i + 131_071] for i in range(0, size, 131_071)]  # PDU-sized, unaligned
    for piece in pieces:
        assert received.write(piece) == len(piece)
        received.file.flush()  # what pynetdicom calls after every fragment
    received.finish()
    path = Path(received.name)
    assert path.parent == tmp_path and path.name.startswith(".incoming-") and path.suffix == ".dcm"
    assert path.read_bytes() == data
    received.finish()  # idempotent
    with pytest.raises(ValueError):
        received.write(b"late")


def test_direct_temp_file_on_tmpfs(tmp_path: Path) -> None:
    """tmpfs refused O_DIRECT before Linux 6.6 (the file is then an ordinary one) and takes it since."""
    with tmpfs(tmp_path / "mem", 8 << 20) as folder:
        received = DirectTempFile(folder)
        received.write(b"x" * 5000)
        received.write(b"y")
        received.finish()
        assert Path(received.name).read_bytes() == b"x" * 5000 + b"y"


def test_an_abandoned_direct_temp_file_closes_and_returns_its_buffer(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(40):  # more than the pool keeps
        received = DirectTempFile(tmp_path)
        received.write(b"partial")
        del received  # an aborted transfer: pynetdicom drops the file object
    assert len(os.listdir("/proc/self/fd")) == before
    assert len(list(tmp_path.iterdir())) == 40  # the partial files stay for Storage.prepare's sweep
