#!/usr/bin/env bash
# The test command: set up (apt + venv) and run every test tier. Run as root for the netns tier
# (without root those tests are skipped with the reason).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
echo "== lint: ruff, mypy (pure core)"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
echo "== tests: unit, system, netns, fuzz"
.venv/bin/python -m pytest -q "$@"
