#!/usr/bin/env bash
# Everything `make test` and `make demo` need on a fresh Debian machine, idempotently:
#   uv (from PyPI), the project's virtualenv from uv.lock, and the pinned realtime-js for the
#   conformance tests. Debian's PostgreSQL packages are installed by `planner dev up`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v uv >/dev/null 2>&1; then
  echo "bootstrap: installing uv from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore uv
fi
uv sync --frozen --quiet

if [ -f tests/js/package-lock.json ]; then
  if ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    else
      echo "bootstrap: npm is missing; install it with: sudo apt-get install -y nodejs npm" >&2
      exit 1
    fi
  fi
  if [ ! -d tests/js/node_modules ] || [ tests/js/package-lock.json -nt tests/js/node_modules ]; then
    echo "bootstrap: installing pinned @supabase/realtime-js (npm ci)" >&2
    (cd tests/js && npm ci --silent --no-audit --no-fund)
  fi
fi
