from pathlib import Path

import pytest

from core.storage import InvalidUID, Storage


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


def test_absolute_refuses_escape(storage: Storage) -> None:
    with pytest.raises(InvalidUID):
        storage.absolute("../outside.dcm")
