#!/usr/bin/env bash
# Install the project in a virtualenv and run `gateway serve` on the embedded default:
# SQLite + storage under ./var, DICOM on port 11112 (AE GATEWAY), HTTP API on 127.0.0.1:8000, two worker processes.
# Configure with GATEWAY_* environment variables (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
python=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/gateway serve "$@"
