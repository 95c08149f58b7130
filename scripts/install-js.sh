#!/usr/bin/env bash
# The pinned npm packages of the tests (tests/js: realtime-js for the Realtime conformance tests,
# supabase-js for the UI snippet of docs/listener.md), for `make test` only: the demo
# and the product need no Node.js. Installs Debian's nodejs and npm first when root.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -f tests/js/package-lock.json ] || exit 0
if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "install-js: installing nodejs and npm from Debian" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "install-js: npm is missing; install it with: sudo apt-get install -y nodejs npm" >&2
    exit 1
  fi
fi
if [ ! -d tests/js/node_modules ] || [ tests/js/package-lock.json -nt tests/js/node_modules ]; then
  echo "install-js: installing the pinned Supabase clients (npm ci in tests/js)" >&2
  (cd tests/js && npm ci --silent --no-audit --no-fund)
fi
