"""The HTTP API as users run it (`gateway serve`: uvicorn on a real socket) and the clients tests use."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydicom import Dataset

from tests.accounts import bearer
from tests.peers import free_port, gateway_serve

BOUNDARY = "gateway-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@dataclass(frozen=True)
class ApiServer:
    url: str
    http_port: int
    dicom_port: int
    pid: int
    data_dir: Path
    #: Authorization of an admin's token (scopes studies:read, stow, admin).
    headers: dict[str, str]

    def rss(self) -> int:
        """The server's resident memory now (bytes), from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")


@contextmanager
def api_server(root: Path, **settings: str) -> Iterator[ApiServer]:
    """`gateway serve` without worker threads (nothing but the listener and the API); ``settings`` are
    GATEWAY_* variables without the prefix, e.g. ``HTTP__STOW_MAX_PARTS="10"``."""
    http_port, dicom_port = free_port(), free_port()
    env = {
        "GATEWAY_DATA_DIR": str(root / "var"),
        "GATEWAY_DICOM__PORT": str(dicom_port),
        "GATEWAY_HTTP__PORT": str(http_port),
        "GATEWAY_WORKER__THREADS": "0",
        **{f"GATEWAY_{name}": value for name, value in settings.items()},
    }
    with gateway_serve(env, root / "gateway.log") as proc:
        yield ApiServer(
            f"http://127.0.0.1:{http_port}", http_port, dicom_port, proc.pid, root / "var", bearer(env)
        )


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def part(data: bytes, content_type: str = "application/dicom") -> bytes:
    return f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"


def multipart(parts: Iterable[bytes]) -> bytes:
    return b"".join(part(p) for p in parts) + f"--{BOUNDARY}--\r\n".encode()


@dataclass
class HealthProbe:
    """GET /healthz in a loop on its own thread (and the server's RSS), while something else happens."""

    server: ApiServer
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=30) as client:
            while not self._stop.is_set():
                self.rss.append(self.server.rss())
                start = time.monotonic()
                try:
                    status = client.get("/healthz").status_code
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                self.latencies.append(time.monotonic() - start)
                if status != 200:
                    self.failures.append(f"status {status}")
                self._stop.wait(0.05)


@contextmanager
def probing(server: ApiServer) -> Iterator[HealthProbe]:
    probe = HealthProbe(server)
    thread = threading.Thread(target=probe.run, daemon=True)
    thread.start()
    try:
        yield probe
    finally:
        probe._stop.set()
        thread.join(60)


@dataclass(frozen=True)
class RawResponse:
    status: int
    body: bytes
    sent: int  # request bytes the client had sent when the response was complete

    def json(self) -> Any:
        return json.loads(self.body)


def raw_post(
    server: ApiServer,
    headers: dict[str, str],
    chunks: Iterable[bytes],
    *,
    path: str = "/dicomweb/studies",
    timeout: float = 60,
) -> RawResponse:
    """POST over a plain socket: the body is sent from ``chunks`` (may be endless) on a thread while the
    response is read, and sending stops once the response is complete, as a client that reads early would."""
    head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\n"
    headers = {**server.headers, **headers}
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    done = threading.Event()
    sent = 0

    def send() -> None:
        nonlocal sent
        try:
            sock.sendall(head.encode())
            for chunk in chunks:
                if done.is_set():
                    return
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server may close once it has answered

    with socket.create_connection(("127.0.0.1", server.http_port), timeout=timeout) as sock:
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        data = b""
        while b"\r\n\r\n" not in data:
            data += _recv(sock)
        header, _, body = data.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        length = next(
            int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"
        )
        while len(body) < length:
            body += _recv(sock)
        done.set()
        at_response = sent
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(5)
    return RawResponse(int(lines[0].split()[1]), body, at_response)


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise AssertionError("connection closed before a complete response")
    return chunk
