"""STOW-RS under load never stalls the API: while a 200 MiB body streams in, while a 10,000- or 100,000-part
body is handled, and while slow clients drip their uploads, every /healthz answers within 1 s and the server's
memory stays flat (short versions of the 1 GiB / 100,000-part / slow-client goals; default limits)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from tests import factories as f
from tests.api.conftest import STOW_TYPE, ApiServer, HealthProbe, api_server, multipart, part, part10, probing

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: Slowest acceptable /healthz answer during an upload (seconds), and the most the server may grow (bytes).
MAX_LATENCY = 1.0
MAX_RSS_GROWTH = 100 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with api_server(tmp_path_factory.mktemp("load")) as s:
        yield s


def _check(probe: HealthProbe, baseline: int, minimum_probes: int = 5) -> None:
    print(
        f"/healthz: {len(probe.latencies)} probes, slowest {max(probe.latencies, default=0):.3f} s; "
        f"RSS {baseline >> 20} MiB, peak {max(probe.rss) >> 20} MiB"
    )
    assert not probe.failures, probe.failures[:5]
    assert len(probe.latencies) >= minimum_probes
    assert max(probe.latencies) < MAX_LATENCY, sorted(probe.latencies)[-5:]
    assert max(probe.rss) - baseline < MAX_RSS_GROWTH, (baseline, max(probe.rss))


def _leftovers(server: ApiServer) -> list[Path]:
    return sorted((server.data_dir / "storage" / "tmp").iterdir())


def _large_instances(count: int, side: int) -> tuple[list[pydicom.Dataset], int]:
    """``count`` CR instances of side x side 16-bit pixels (headers only in memory), and the body size."""
    datasets = []
    for _ in range(count):
        ds = f.chest_radiograph(sop_class=f.CR, modality="CR")
        ds.Rows = ds.Columns = side
        ds.PixelData = b""
        datasets.append(ds)
    size = sum(len(part(_header(ds, side))) + 2 * side * side for ds in datasets) + len(multipart([]))
    return datasets, size


def _header(ds: pydicom.Dataset, side: int) -> bytes:
    """The file up to the Pixel Data value (the pixels follow: 2 * side * side bytes)."""
    data = part10(ds)
    assert data.endswith(b"\xe0\x7f\x10\x00OW\x00\x00\x00\x00\x00\x00")
    return data[:-4] + (2 * side * side).to_bytes(4, "little")


def _stream(datasets: list[pydicom.Dataset], side: int) -> Iterator[bytes]:
    """The body, generated as it is sent: 1 MiB of pixels at a time."""
    block = np.arange(1 << 19, dtype=np.uint16).tobytes()
    for ds in datasets:
        yield part(_header(ds, side))[: -len(b"\r\n")]
        left = 2 * side * side
        while left:
            chunk = block[: min(left, len(block))]
            left -= len(chunk)
            yield chunk
        yield b"\r\n"
    yield multipart([])


def test_200_mib_streamed_body(server: ApiServer) -> None:
    side = 2048  # 8 MiB of pixels each, like a CR
    datasets, size = _large_instances(25, side)
    assert size > 200 << 20
    baseline = server.rss()
    with probing(server) as probe:
        rsp = httpx.post(
            f"{server.url}/dicomweb/studies",
            content=_stream(datasets, side),
            headers={**server.headers, "Content-Type": STOW_TYPE, "Content-Length": str(size)},
            timeout=600,
        )
    assert rsp.status_code == 200, rsp.text
    stored = pydicom.Dataset.from_json(rsp.json()).ReferencedSOPSequence
    assert [i.ReferencedSOPInstanceUID for i in stored] == [ds.SOPInstanceUID for ds in datasets]
    _check(probe, baseline)
    assert _leftovers(server) == []
    last = datasets[-1]
    path = server.data_dir / "storage/instances" / last.StudyInstanceUID / last.SeriesInstanceUID
    assert (path / f"{last.SOPInstanceUID}.dcm").stat().st_size > 2 * side * side


@pytest.mark.parametrize(("parts", "status"), [(10_000, 409), (100_000, 413)])
def test_many_tiny_parts(server: ApiServer, parts: int, status: int) -> None:
    """10,000 parts (the default limit) are each answered; 100,000 are refused at part 10,001."""
    body = multipart([b"tiny"] * parts)
    baseline = server.rss()
    with probing(server) as probe:
        rsp = httpx.post(
            f"{server.url}/dicomweb/studies",
            content=body,
            headers={**server.headers, "Content-Type": STOW_TYPE},
            timeout=600,
        )
    assert rsp.status_code == status, rsp.text[:200]
    if status == 409:
        failed = rsp.json()["00081198"]["Value"]
        assert len(failed) == parts and all(
            i == {"00081197": {"vr": "US", "Value": [0xC000]}} for i in failed
        )
    else:
        assert "more than 10000 parts" in rsp.json()["detail"]
    _check(probe, baseline, minimum_probes=2)
    assert _leftovers(server) == []


def test_slow_clients(server: ApiServer) -> None:
    """24 uploads at about 4 KB/s each, more than the STOW threads (4) and than uvicorn would queue."""
    results: list[int] = []

    def upload() -> None:
        ds = f.chest_radiograph()
        ds.Rows = ds.Columns = 64
        ds.PixelData = ds.PixelData[: 2 * 64 * 64]
        body = multipart([part10(ds)])

        def drip() -> Iterator[bytes]:
            for start in range(0, len(body), 1024):
                time.sleep(0.25)
                yield body[start : start + 1024]

        rsp = httpx.post(
            f"{server.url}/dicomweb/studies",
            content=drip(),
            headers={**server.headers, "Content-Type": STOW_TYPE},
            timeout=120,
        )
        results.append(rsp.status_code)

    baseline = server.rss()
    with probing(server) as probe:
        clients = [threading.Thread(target=upload) for _ in range(24)]
        for c in clients:
            c.start()
        for c in clients:
            c.join(300)
    assert results == [200] * 24
    _check(probe, baseline, minimum_probes=10)
