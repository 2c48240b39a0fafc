"""TLS settings: the listener's (GATEWAY_DICOM__TLS_*) and each destination's, files checked at start-up."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from core.domain import Destination, DestinationTls
from core.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def pem(tmp_path: Path) -> dict[str, Path]:
    """Files that exist (their content is only read when a context is built)."""
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    return files


def test_tls_is_off_by_default() -> None:
    s = load_settings()
    assert s.dicom.tls_port is None and s.dicom.tls_require_client_certificate is False


def test_listener_tls_from_the_environment(monkeypatch: pytest.MonkeyPatch, pem: dict[str, Path]) -> None:
    monkeypatch.setenv("GATEWAY_DICOM__TLS_PORT", "2762")
    monkeypatch.setenv("GATEWAY_DICOM__TLS_CERTIFICATE", str(pem["cert"]))
    monkeypatch.setenv("GATEWAY_DICOM__TLS_PRIVATE_KEY", str(pem["key"]))
    monkeypatch.setenv("GATEWAY_DICOM__TLS_CA_CERTIFICATES", str(pem["ca"]))
    monkeypatch.setenv("GATEWAY_DICOM__TLS_REQUIRE_CLIENT_CERTIFICATE", "true")
    dicom = load_settings().dicom
    assert (dicom.port, dicom.tls_port) == (11112, 2762)
    assert (dicom.tls_certificate, dicom.tls_private_key, dicom.tls_ca_certificates) == (
        pem["cert"],
        pem["key"],
        pem["ca"],
    )
    assert dicom.tls_require_client_certificate


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TLS_PORT": "2762"}, "GATEWAY_DICOM__TLS_PORT needs GATEWAY_DICOM__TLS_CERTIFICATE"),
        (
            {"TLS_PORT": "2762", "TLS_CERTIFICATE": "{cert}", "TLS_PRIVATE_KEY": "{tmp}/missing.key"},
            "GATEWAY_DICOM__TLS_PRIVATE_KEY: {tmp}/missing.key does not exist",
        ),
        (
            {
                "TLS_PORT": "2762",
                "TLS_CERTIFICATE": "{cert}",
                "TLS_PRIVATE_KEY": "{key}",
                "TLS_REQUIRE_CLIENT_CERTIFICATE": "1",
            },
            "TLS_REQUIRE_CLIENT_CERTIFICATE needs GATEWAY_DICOM__TLS_CA_CERTIFICATES",
        ),
        (
            {"TLS_CERTIFICATE": "{cert}", "TLS_PRIVATE_KEY": "{key}"},
            "GATEWAY_DICOM__TLS_CERTIFICATE, GATEWAY_DICOM__TLS_PRIVATE_KEY set but GATEWAY_DICOM__TLS_PORT",
        ),
        (
            {"PORT": "104", "TLS_PORT": "104", "TLS_CERTIFICATE": "{cert}", "TLS_PRIVATE_KEY": "{key}"},
            "GATEWAY_DICOM__TLS_PORT must differ from GATEWAY_DICOM__PORT",
        ),
        ({"TLS_PORT": "70000"}, "GATEWAY_DICOM__TLS_PORT"),
    ],
)
def test_listener_tls_misconfiguration_is_named(
    monkeypatch: pytest.MonkeyPatch, pem: dict[str, Path], tmp_path: Path, env: dict[str, str], message: str
) -> None:
    names = {"cert": pem["cert"], "key": pem["key"], "tmp": tmp_path}
    for name, value in env.items():
        monkeypatch.setenv("GATEWAY_DICOM__" + name, value.format(**names))
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert message.format(**names) in str(err.value)


def _destination(**extra: object) -> str:
    return json.dumps([{"name": "pacs", "ae_title": "PACS", "host": "pacs.example", "port": 2762, **extra}])


def test_destination_tls(monkeypatch: pytest.MonkeyPatch, pem: dict[str, Path]) -> None:
    monkeypatch.setenv(
        "GATEWAY_DESTINATIONS",
        _destination(
            tls=True,
            tls_ca_certificates=str(pem["ca"]),
            tls_certificate=str(pem["cert"]),
            tls_private_key=str(pem["key"]),
            tls_verify_hostname=False,
        ),
    )
    tls = DestinationTls(pem["ca"], pem["cert"], pem["key"], verify_hostname=False)
    assert load_settings().destinations == [Destination("pacs", "PACS", "pacs.example", 2762, tls=tls)]


def test_destination_tls_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DESTINATIONS", _destination(tls=True))
    (destination,) = load_settings().destinations
    assert destination.tls == DestinationTls(None, None, None, verify_hostname=True)
    monkeypatch.setenv("GATEWAY_DESTINATIONS", _destination(tls=False))
    assert load_settings().destinations[0].tls is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"tls": True, "tls_ca_certificates": "{tmp}/nope.pem"},
            "'pacs': tls_ca_certificates: {tmp}/nope.pem",
        ),
        ({"tls": True, "tls_certificate": "{cert}"}, "tls_certificate and tls_private_key go together"),
        ({"tls_ca_certificates": "{ca}"}, 'tls_ca_certificates given without "tls": true'),
        ({"tls": "yes"}, "tls must be true or false"),
        ({"tls": True, "tls_verify_hostname": "no"}, "tls_verify_hostname must be true or false"),
        ({"tls": True, "tls_cipher": "NULL"}, "optionally tls, tls_ca_certificates"),
    ],
)
def test_destination_tls_misconfiguration_is_named(
    monkeypatch: pytest.MonkeyPatch,
    pem: dict[str, Path],
    tmp_path: Path,
    extra: dict[str, object],
    message: str,
) -> None:
    names = {"cert": pem["cert"], "ca": pem["ca"], "tmp": tmp_path}
    extra = {k: v.format(**names) if isinstance(v, str) else v for k, v in extra.items()}
    monkeypatch.setenv("GATEWAY_DESTINATIONS", _destination(**extra))
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "GATEWAY_DESTINATIONS" in str(err.value)
    assert message.format(**names) in str(err.value)
