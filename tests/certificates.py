"""Throw-away certificates for DICOM TLS tests, made at test time by the openssl command (never committed)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers import require_tool


@dataclass(frozen=True)
class Pair:
    certificate: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Two unrelated CAs; everything but ``stranger`` is signed by ``ca``."""

    ca: Path
    other_ca: Path
    server: Pair  # names localhost and 127.0.0.1
    wrong_name: Pair  # a server certificate for pacs.example only
    client: Pair
    stranger: Pair  # a client certificate signed by other_ca


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(base: Path, name: str) -> Pair:
    pair = Pair(base / f"{name}.pem", base / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc",
        "-keyout", str(pair.key), "-out", str(pair.certificate), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def _leaf(base: Path, name: str, ca: Pair, extensions: str) -> Pair:
    pair = Pair(base / f"{name}.pem", base / f"{name}.key")
    request, ext = base / f"{name}.csr", base / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\n" + extensions)
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc",
        "-keyout", str(pair.key), "-out", str(request), "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.certificate), "-CAkey", str(ca.key),
        "-CAcreateserial", "-out", str(pair.certificate), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return pair


def make_pki(base: Path) -> Pki:
    """Write a CA, server and client certificates (EC P-256, valid two days) under ``base``."""
    require_tool("openssl", "openssl")
    base.mkdir(parents=True, exist_ok=True)
    ca, other = _ca(base, "ca"), _ca(base, "other-ca")
    server = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    wrong_name = "subjectAltName=DNS:pacs.example\nextendedKeyUsage=serverAuth\n"
    client = "extendedKeyUsage=clientAuth\n"
    return Pki(
        ca=ca.certificate,
        other_ca=other.certificate,
        server=_leaf(base, "server", ca, server),
        wrong_name=_leaf(base, "wrong-name", ca, wrong_name),
        client=_leaf(base, "client", ca, client),
        stranger=_leaf(base, "stranger", other, client),
    )
