"""C-STORE delivery over DICOM TLS to dcmtk storescp +tls, certificates made at test time."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest

from core.domain import Destination, DestinationTls
from reporting.delivery import send_cstore
from tests.certificates import Pair, Pki, make_pki
from tests.peers import free_port, stop, wait_port

STORESCP = "/usr/bin/storescp"  # dcmtk's, not pynetdicom's app of the same name


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def tls_storescp(
    out: Path, pki: Pki, *, certificate: Pair | None = None, client_certificate: bool = False
) -> Iterator[Destination]:
    """dcmtk storescp over TLS as the PACS (AE PACS); requires a client certificate signed by ``pki.ca``
    when ``client_certificate``, else asks for none."""
    pair = certificate or pki.server
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    peer = ["-rc", "+cf", str(pki.ca)] if client_certificate else ["-ic"]
    command = [STORESCP, "+tls", str(pair.key), str(pair.certificate), *peer, "-aet", "PACS", "-od", str(out)]
    proc = subprocess.Popen([*command, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc=proc)
        yield Destination("pacs", "PACS", "127.0.0.1", port, tls=DestinationTls(ca_certificates=pki.ca))
    finally:
        stop(proc)


def _received(out: Path) -> list[str]:
    return [pydicom.dcmread(p).SOPInstanceUID for p in out.iterdir()]


def test_sent_over_tls_with_the_ca_verified(chest_report_path: Path, pki: Pki, tmp_path: Path) -> None:
    with tls_storescp(tmp_path / "in", pki) as destination:
        result = send_cstore(chest_report_path, destination, timeout=10)
    assert (result.outcome, result.status) == ("sent", 0x0000), result.detail
    assert _received(tmp_path / "in") == [pydicom.dcmread(chest_report_path).SOPInstanceUID]


def test_ca_that_does_not_match_is_a_retry_with_the_reason(
    chest_report_path: Path, pki: Pki, tmp_path: Path
) -> None:
    with tls_storescp(tmp_path / "in", pki) as destination:
        strange = replace(destination, tls=DestinationTls(ca_certificates=pki.other_ca))
        result = send_cstore(chest_report_path, strange, timeout=10)
    assert (result.outcome, result.status) == ("retry", None)
    assert "TLS" in result.detail and "certificate verify failed" in result.detail, result.detail
    assert list((tmp_path / "in").iterdir()) == []


def test_host_name_is_checked_unless_turned_off(chest_report_path: Path, pki: Pki, tmp_path: Path) -> None:
    with tls_storescp(tmp_path / "in", pki, certificate=pki.wrong_name) as destination:
        checked = send_cstore(chest_report_path, destination, timeout=10)
        assert destination.tls is not None
        unchecked = replace(destination, tls=replace(destination.tls, verify_hostname=False))
        sent = send_cstore(chest_report_path, unchecked, timeout=10)
    assert checked.outcome == "retry"
    assert "mismatch" in checked.detail, checked.detail  # "IP address mismatch, certificate is not valid ..."
    assert sent.outcome == "sent", sent.detail


def test_client_certificate_when_the_pacs_requires_one(
    chest_report_path: Path, pki: Pki, tmp_path: Path
) -> None:
    with tls_storescp(tmp_path / "in", pki, client_certificate=True) as destination:
        without = send_cstore(chest_report_path, destination, timeout=10)
        assert destination.tls is not None
        mutual = replace(
            destination,
            tls=replace(destination.tls, certificate=pki.client.certificate, private_key=pki.client.key),
        )
        with_certificate = send_cstore(chest_report_path, mutual, timeout=10)
    assert without.outcome == "retry"
    assert "TLS" in without.detail, without.detail
    assert with_certificate.outcome == "sent", with_certificate.detail
    assert len(_received(tmp_path / "in")) == 1


def test_plain_destination_on_a_tls_port_is_a_retry(
    chest_report_path: Path, pki: Pki, tmp_path: Path
) -> None:
    with tls_storescp(tmp_path / "in", pki) as destination:
        result = send_cstore(chest_report_path, replace(destination, tls=None), timeout=5)
    assert (result.outcome, result.status) == ("retry", None), result.detail


def test_tls_files_that_do_not_load_are_a_retry(chest_report_path: Path, pki: Pki, tmp_path: Path) -> None:
    gone = tmp_path / "gone.pem"
    destination = Destination(
        "pacs", "PACS", "127.0.0.1", free_port(), tls=DestinationTls(ca_certificates=gone)
    )
    result = send_cstore(chest_report_path, destination, timeout=5)
    assert result.outcome == "retry"
    assert result.detail.startswith("TLS settings of destination 'pacs'"), result.detail
    assert "No such file" in result.detail, result.detail
