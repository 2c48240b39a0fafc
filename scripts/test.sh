#!/usr/bin/env bash
# Install everything the tests need (Debian packages, a virtualenv with the project) and run the tests.
# Usage: ./scripts/test.sh [pytest arguments]
# Runs ruff (lint + format), mypy, import-linter's architecture contracts, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers the tests start: dcmtk (storescu/storescp/echoscu and its JPEG/JPEG-LS/RLE encoders),
# dicom3tools (dciodvfy validates every SR), PostgreSQL server binaries (each test session starts its own
# cluster on a free loopback port), Orthanc 1.10 with its Python plugin (started per test on free ports),
# openssl (throw-away certificates for the DICOM TLS tests), chromium (the browser tests drive it with Playwright),
# poppler-utils (pdftotext/pdftoppm read the PDF reports), Pango (WeasyPrint renders them).
need=()
[ -x /usr/bin/storescu ] || need+=(dcmtk)  # by path: pynetdicom installs a storescu of its own
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancPython.so ] || need+=(orthanc-python)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ -x /usr/bin/chromium ] || need+=(chromium)  # Playwright drives Debian's chromium (no browser download)
command -v pdftotext >/dev/null 2>&1 || need+=(poppler-utils)  # the PDF tests read reports with pdftotext
ldconfig -p 2>/dev/null | grep -q libpango-1.0 || need+=(libpango-1.0-0 libpangoft2-1.0-0)  # WeasyPrint
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || need+=(docker-compose)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[train,test]"

# Static checks first: any failure fails the test command.
echo "ruff, mypy, import contracts"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy core dicom_listener inference reporting api orthanc gateway training tests
# The Orthanc plugin imports Orthanc's embedded `orthanc` module: checked against its stub, not our package.
(cd orthanc/plugin && MYPYPATH=stubs ../../.venv/bin/mypy --config-file ../../pyproject.toml screening_gateway.py)
.venv/bin/lint-imports

exec .venv/bin/python -m pytest "$@"
