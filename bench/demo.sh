#!/usr/bin/env bash
# The first command of the README: set up (apt + venv), then replicate live HTTP traffic inside
# private network namespaces and print how much of it reached the target.
#   bash bench/demo.sh [--keepalive N] [--connections N] [--short N] [--keep]   (as root)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (network namespaces, raw sockets, NFQUEUE): run it as root (or with sudo)" >&2
  exit 2
fi
bash tests/setup.sh
exec .venv/bin/python bench/demo.py "$@"
