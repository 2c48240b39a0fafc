import subprocess
import sys

import pytest

from core.domain import Destination
from core.settings import SettingsError, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    s = load_settings()
    assert s.dicom.ae_title == "GATEWAY" and s.dicom.port == 11112 and s.http.port == 8000
    assert s.http.host == "127.0.0.1"
    assert s.completion.quiet_seconds == 2 and s.completion.max_wait_seconds == 30
    assert s.sqlalchemy_url.startswith("sqlite:///") and s.sqlalchemy_url.endswith("var/gateway.sqlite3")
    assert s.destinations == [] and s.dicom.allowed_calling_aes == []


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_DICOM__AE_TITLE", "SCREEN1")
    monkeypatch.setenv("GATEWAY_DICOM__ALLOWED_CALLING_AES", "CT1, MODALITY")
    monkeypatch.setenv(
        "GATEWAY_DESTINATIONS", '[{"name":"pacs","ae_title":"PACS","host":"10.0.0.5","port":104}]'
    )
    monkeypatch.setenv("GATEWAY_DATABASE_URL", "postgresql+psycopg://u:p@db/gw")
    monkeypatch.setenv("GATEWAY_COMPLETION__QUIET_SECONDS", "0.5")
    monkeypatch.setenv("GATEWAY_ROUTING__CHEST_BODY_PARTS", "CHEST,LUNG")
    s = load_settings()
    assert s.dicom.ae_title == "SCREEN1"
    assert s.dicom.allowed_calling_aes == ["CT1", "MODALITY"]
    assert s.destinations == [Destination("pacs", "PACS", "10.0.0.5", 104)]
    assert s.sqlalchemy_url == "postgresql+psycopg://u:p@db/gw"
    assert s.completion.quiet_seconds == 0.5
    assert s.routing.chest_body_parts == ["CHEST", "LUNG"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_DICOM__PORT", "70000"),
        ("GATEWAY_DICOM__AE_TITLE", "THIS_TITLE_IS_TOO_LONG"),
        ("GATEWAY_DESTINATIONS", '[{"name":"pacs","host":"x"}]'),
        ("GATEWAY_DESTINATIONS", "not json"),
        ("GATEWAY_COMPLETION__MAX_WAIT_SECONDS", "-1"),
        ("GATEWAY_HTTP__PORT", "eighty"),
    ],
)
def test_invalid_setting_is_named(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert name.split("__")[0] in str(err.value)


def test_cli_refuses_invalid_settings_at_start_up(tmp_path) -> None:
    env = {"GATEWAY_DICOM__PORT": "-3", "GATEWAY_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert "GATEWAY_DICOM__PORT" in proc.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "must point at PostgreSQL"),
        ({"GATEWAY_DATABASE_URL": "postgresql+psycopg://gw:postgres@db/gw"}, "well-known default"),
        ({"GATEWAY_DATABASE_URL": "postgresql+psycopg://gw@db/gw"}, "no password"),
        (
            {
                "GATEWAY_DATABASE_URL": "postgresql+psycopg://gw:Xk93-long-pw@db/gw",
                "GATEWAY_ORTHANC__URL": "http://orthanc:8042",
                "GATEWAY_ORTHANC__WEBHOOK_SECRET": "short",
            },
            "WEBHOOK_SECRET",
        ),
    ],
)
def test_production_refuses_default_or_missing_secrets(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    monkeypatch.setenv("GATEWAY_ENVIRONMENT", "production")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_production_accepts_real_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ENVIRONMENT", "production")
    monkeypatch.setenv("GATEWAY_DATABASE_URL", "postgresql+psycopg://gw:Xk93-long-pw@db/gw")
    monkeypatch.setenv("GATEWAY_ORTHANC__URL", "http://orthanc:8042")
    monkeypatch.setenv("GATEWAY_ORTHANC__WEBHOOK_SECRET", "9f2c1d7e5a4b3c2d1e0f")
    assert load_settings().environment == "production"
