#!/usr/bin/env bash
# The test command: set up (apt + venv) and run every test tier. Run as root for the netns tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
