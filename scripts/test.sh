#!/usr/bin/env bash
# The test command (README "Quick start", and what CI runs): set up .venv, lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e ".[test,onnx,qonnx,cli]"
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
