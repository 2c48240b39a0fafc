"""What the HTTP API refuses, against `gateway serve` on a real socket: foreign Host headers (DNS rebinding),
STOW-RS requests over a limit (413 as soon as exceeded), idle uploads (408), bad parts (which fail alone)."""

from __future__ import annotations

import io
import itertools
import json
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import uvicorn
from pydicom.uid import generate_uid

from api.main import create_app
from core.db import make_engine, make_sessionmaker
from core.migrate import upgrade
from core.settings import HttpSettings, Settings
from tests import factories as f
from tests.api.conftest import STOW_TYPE, ApiServer, api_server, multipart, part, part10, raw_post
from tests.peers import free_port, wait_port

pytestmark = [pytest.mark.e2e]

MAX_BODY = 4 << 20
MAX_PARTS = 20
MAX_PART = 1 << 20
IDLE = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with api_server(
        tmp_path_factory.mktemp("guard"),
        HTTP__ALLOWED_HOSTS="localhost,127.0.0.1,::1,gateway.example",
        HTTP__STOW_MAX_BODY_BYTES=str(MAX_BODY),
        HTTP__STOW_MAX_PARTS=str(MAX_PARTS),
        HTTP__STOW_IDLE_SECONDS=str(IDLE),
        INGEST__MAX_INSTANCE_BYTES=str(MAX_PART),
    ) as s:
        yield s


def _leftovers(server: ApiServer) -> list[Path]:
    return sorted((server.data_dir / "storage" / "tmp").iterdir())


def _stored(server: ApiServer) -> list[Path]:
    return sorted((server.data_dir / "storage").glob("instances/*/*/*.dcm"))


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.nip.io", "[::2]", ""])
def test_foreign_host_is_refused(server: ApiServer, host: str) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in (("GET", "/healthz"), ("GET", "/api/studies"), ("POST", "/dicomweb/studies")):
            rsp = client.request(method, path, headers={"Host": host})
            assert rsp.status_code == 400 and rsp.text == "Invalid host header", (method, path)


@pytest.mark.parametrize(
    "host", ["localhost", "127.0.0.1:{port}", "LOCALHOST:{port}", "[::1]:{port}", "gateway.example"]
)
def test_allowed_host_is_answered(server: ApiServer, host: str) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        rsp = client.get("/healthz", headers={"Host": host.format(port=server.http_port)})
    assert rsp.status_code == 200, rsp.text


def test_star_allows_any_host(tmp_path: Path) -> None:
    """The same check in an app built by create_app and served by uvicorn in this process."""
    settings = Settings(data_dir=tmp_path, http=HttpSettings(allowed_hosts=["*"]))
    engine = make_engine(settings.sqlalchemy_url)
    upgrade(engine)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(make_sessionmaker(engine), settings), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_port(port)
        rsp = httpx.get(f"http://127.0.0.1:{port}/healthz", headers={"Host": "any.example"}, timeout=30)
        assert rsp.status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
        engine.dispose()
    assert HttpSettings(host="10.1.2.3").trusted_hosts == ["localhost", "127.0.0.1", "[::1]", "10.1.2.3"]
    assert "0.0.0.0" not in HttpSettings(host="0.0.0.0").trusted_hosts
    with pytest.raises(ValueError, match="wildcard"):
        HttpSettings(allowed_hosts=["evil*.example"])


def test_declared_length_over_the_limit_is_413_before_any_body_byte(server: ApiServer) -> None:
    rsp = raw_post(server, {"Content-Type": STOW_TYPE, "Content-Length": str(MAX_BODY + 1)}, [])
    assert rsp.status == 413 and rsp.sent == 0
    assert str(MAX_BODY) in rsp.json()["detail"]


def _endless_part() -> Iterator[bytes]:
    yield b"--gateway-test-boundary\r\nContent-Type: application/dicom\r\n\r\n"
    yield from itertools.repeat(b"\0" * 65536)


def _endless_tiny_parts() -> Iterator[bytes]:
    yield from itertools.repeat(part(b"x") * 1000)


@pytest.mark.parametrize(
    ("chunks", "limit", "message"),
    [
        (_endless_part, MAX_PART, "a part exceeds"),
        (_endless_tiny_parts, MAX_PARTS, f"more than {MAX_PARTS} parts"),
    ],
    ids=["part-bytes", "parts"],
)
def test_endless_body_is_413_as_soon_as_a_limit_is_exceeded(
    server: ApiServer, chunks: Callable[[], Iterator[bytes]], limit: int, message: str
) -> None:
    """Chunked (no Content-Length) and endless: the answer comes while the client is still sending."""
    rsp = raw_post(server, {"Content-Type": STOW_TYPE, "Transfer-Encoding": "chunked"}, _chunked(chunks()))
    assert rsp.status == 413 and message in rsp.json()["detail"]
    assert rsp.sent < 64 << 20  # socket buffers hold a few MB; the body never ends
    assert _leftovers(server) == []


def test_chunked_body_over_the_byte_limit_is_413(server: ApiServer) -> None:
    parts = (part(b"y" * (MAX_PART // 2)) for _ in itertools.count())  # each part under the part limit
    rsp = raw_post(server, {"Content-Type": STOW_TYPE, "Transfer-Encoding": "chunked"}, _chunked(parts))
    assert rsp.status == 413 and f"exceeds {MAX_BODY} bytes" in rsp.json()["detail"]
    assert _leftovers(server) == []


def _chunked(chunks: Iterator[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        yield b"%x\r\n%s\r\n" % (len(chunk), chunk)


def test_idle_upload_is_408(server: ApiServer) -> None:
    def stalled() -> Iterator[bytes]:
        yield part(part10(f.chest_radiograph()))[:5000]
        time.sleep(3 * IDLE + 30)  # sends nothing more; raw_post stops us once answered

    rsp = raw_post(server, {"Content-Type": STOW_TYPE, "Content-Length": "1000000"}, stalled())
    assert rsp.status == 408 and "no request body bytes" in rsp.json()["detail"]
    assert _leftovers(server) == []


def _post(server: ApiServer, body: bytes, content_type: str = STOW_TYPE) -> httpx.Response:
    return httpx.post(
        f"{server.url}/dicomweb/studies",
        content=body,
        headers={**server.headers, "Content-Type": content_type},
        timeout=60,
    )


def test_whole_request_refusals_store_nothing(server: ApiServer) -> None:
    good = part10(f.chest_radiograph())
    before = _stored(server)
    cut = multipart([good])[: -len("--gateway-test-boundary--\r\n")]  # no closing boundary
    assert _post(server, cut).status_code == 400
    assert _post(server, multipart([good]), "multipart/related").status_code == 400  # no boundary
    assert _post(server, b"--x\r\n\r\n", "application/json").status_code == 415
    other = part(good) + part(b"hello", "text/plain") + b"--gateway-test-boundary--\r\n"
    rsp = _post(server, other)
    assert rsp.status_code == 415 and "hello" not in rsp.text
    garbage = b"\xff\xfe" * 100 + b"\r\n--gateway-test-boundary--\r\n"
    rsp = _post(server, garbage)
    assert rsp.status_code == 400 and "\\xff" not in rsp.text and "\xff" not in rsp.text
    assert _stored(server) == before and _leftovers(server) == []


def test_validation_errors_do_not_quote_the_input(server: ApiServer) -> None:
    body = {"username": ["MZ\x90\x00payload"], "role": "admin", "password": "x"}
    rsp = httpx.post(f"{server.url}/api/users", json=body, headers=server.headers, timeout=30)
    assert rsp.status_code == 422 and rsp.json()["detail"][0]["loc"] == ["body", "username"]
    assert "payload" not in rsp.text and "MZ" not in rsp.text


def _nested(depth: int) -> bytes:
    """A valid dataset (no pixel data) ending in a Content Sequence nested ``depth`` items deep."""
    ds = f.base_dataset(f.SC, "OT")
    head = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    tail = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return part10(ds) + head * depth + tail * depth


def _overflowing() -> bytes:
    ds = f.chest_radiograph()
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 2**31 - 1
    return part10(ds)


def test_bad_parts_fail_alone_with_their_reason(server: ApiServer) -> None:
    good = [f.chest_radiograph(study_uid=generate_uid()) for _ in range(4)]
    mz, elf = bytearray(part10(good[1])), bytearray(part10(good[2]))
    mz[:4], elf[:4] = b"MZ\x90\x00", b"\x7fELF"
    without_preamble = io.BytesIO()
    pydicom.dcmwrite(without_preamble, good[3])  # as dicomweb-client does: file meta, no preamble, no DICM
    bad_uid = f.chest_radiograph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad_uid.SOPInstanceUID = "1.2.3.\x00MZ-not-a-uid"
        bad_uid_part = part10(bad_uid)
    truncated = part10(f.chest_radiograph())
    bad = [
        b"not dicom at all",
        truncated[: len(truncated) // 2],
        _nested(10_000),
        _overflowing(),
        bad_uid_part,
    ]
    body = multipart([part10(good[0]), *bad, bytes(mz), bytes(elf), without_preamble.getvalue()])
    rsp = _post(server, body)
    assert rsp.status_code == 202, rsp.text
    result = pydicom.Dataset.from_json(rsp.json())
    assert [str(i.ReferencedSOPInstanceUID) for i in result.ReferencedSOPSequence] == [
        str(ds.SOPInstanceUID) for ds in good
    ]
    assert [i.FailureReason for i in result.FailedSOPSequence] == [0xC000] * len(bad)
    # no byte of a refused part comes back, only valid UIDs
    assert "MZ" not in rsp.text and "not dicom" not in rsp.text
    assert {k for i in rsp.json()["00081198"]["Value"] for k in i} <= {"00081150", "00081155", "00081197"}
    for ds in good:
        path = server.data_dir / "storage" / "instances" / ds.StudyInstanceUID / ds.SeriesInstanceUID
        data = (path / f"{ds.SOPInstanceUID}.dcm").read_bytes()
        assert data[:128] == bytes(128) and data[128:132] == b"DICM"
        assert pydicom.dcmread(path / f"{ds.SOPInstanceUID}.dcm").PixelData == ds.PixelData
    assert _leftovers(server) == []
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as client:
        for ds in good:
            study = client.get(f"/api/studies/{ds.StudyInstanceUID}").json()
            assert study["instances"] == 1 and json.dumps(study).isascii()
