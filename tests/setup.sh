#!/usr/bin/env bash
# One-time set-up of a fresh Debian machine (run as root): system packages and the venv.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PKGS=(libnetfilter-queue-dev libnfnetlink-dev libpcap-dev nginx-light iptables iproute2
          redis-server redis-tools apache2-utils wrk tcpdump procps psmisc prometheus systemd
          gcc libc6-dev postgresql postgresql-contrib)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian may start nginx/redis/prometheus/postgresql on install; our tests run their own
# instances in namespaces, so the host copies are only stopped (never pkill: a running test
# owns its own).
systemctl stop nginx redis-server prometheus postgresql >/dev/null 2>&1 || true
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# engine.io._fastio (sendmmsg/recvmmsg) and engine/dataplane/*.pyx (Cython, fetched by pip as a
# build requirement) are compiled by the install below: they need gcc and Python's headers (a
# Debian python3 has them in python3-dev; without them the install falls back, logged).  gcc
# also brings libasan/libubsan for tests/fuzz/dataplane_asan.py.
if ! .venv/bin/python -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  echo "setup: installing python3-dev (headers for the C extension)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-dev >/dev/null || true
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[live,test]'
echo "setup: ok ($(.venv/bin/python --version))"
