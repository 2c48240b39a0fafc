"""docker-compose.yml is valid (compose CLI, no engine needed) and refuses to start without its secrets."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.peers import REPO

SECRETS = {
    "POSTGRES_PASSWORD": "pg-Xk93-long",
    "ORTHANC_PASSWORD": "or-Xk93-long",
    "GATEWAY_WEBHOOK_SECRET": "whs-0123456789abcdef",
}


def _compose() -> list[str]:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise AssertionError("no compose CLI: install the Debian package docker-compose (scripts/test.sh does)")


def _config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [*_compose(), "-f", str(REPO / "docker-compose.yml"), "config"],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_is_valid() -> None:
    result = _config(SECRETS)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for service in ("postgres:", "orthanc:", "migrate:", "gateway:", "worker:"):
        assert f"  {service}" in out
    assert "pg_isready" in out and "GATEWAY_WORKER__THREADS: '0'" in out
    assert "GATEWAY_ENVIRONMENT: production" in out


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_missing_secrets(missing: str) -> None:
    result = _config({k: v for k, v in SECRETS.items() if k != missing})
    assert result.returncode != 0 and f"set {missing}" in result.stderr
