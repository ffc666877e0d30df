#!/usr/bin/env bash
# The live benchmark: set up (apt + venv + the bench extras), then measure tcpcopy-mp beside C TCPCopy
# 1.0 (built once from ../shared/anchor) per scenario inside private network namespaces.
#   bash bench/run.sh [--quick] [--no-setup] [--peer c|none] [bench_live.py options, see --help]   (as root)
# --no-setup skips tests/setup.sh (it stops every nginx on the machine: do not use it while
# other netns tests run).  Results: bench/results/latest.{json,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "bench: needs root (network namespaces, raw sockets, NFQUEUE): run it as root (or with sudo)" >&2
  exit 2
fi
setup=1
args=()
for a in "$@"; do
  if [ "$a" = "--no-setup" ]; then setup=0; else args+=("$a"); fi
done
if [ "$setup" -eq 1 ]; then
  bash tests/setup.sh
fi
if ! .venv/bin/python -c 'import matplotlib' >/dev/null 2>&1 || [ ! -x .venv/bin/py-spy ]; then
  echo "bench: installing the bench extras (matplotlib, py-spy)"
  .venv/bin/pip install -q -e '.[bench]'
fi
exec .venv/bin/python bench/bench_live.py "${args[@]}"
