#!/usr/bin/env bash
# Everything `make demo` needs on a fresh Debian 12 machine, idempotently:
#   1. uv: the one on PATH, else a small virtualenv of its own in .tools/uv (Debian's python3
#      refuses `pip install` outside a virtualenv, PEP 668); python3-venv is installed first
#      when it is missing and we are root;
#   2. the project's virtualenv (.venv) from uv.lock;
#   3. the Debian packages the local stack runs on (PostgreSQL 15, pg_cron, wal2json): missing
#      ones are installed; with CI=true every one is upgraded to apt's newest candidate (the
#      local stack is stopped first), so package drift breaks CI before it breaks a newcomer;
#      and pgbouncer, which the pooler tests run (installed when missing).
# The npm packages only the conformance tests need are scripts/install-js.sh (make test).
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
TOOLS=.tools/uv

say() { echo "bootstrap: $*" >&2; }
die() { say "$*"; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

install_uv() {
  if ! command -v python3 >/dev/null 2>&1; then
    is_root || die "python3 is missing; install it with: sudo apt-get install -y python3 python3-venv"
    say "installing python3 and python3-venv from Debian"
    apt_install python3 python3-venv
  fi
  # Without python3-venv, `import venv` works but ensurepip (and so `python3 -m venv`) does not.
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    is_root || die "python3 cannot create virtualenvs; install it with: sudo apt-get install -y python3-venv"
    say "installing python3-venv from Debian"
    apt_install python3-venv
  fi
  say "installing uv $UV_VERSION from PyPI into $TOOLS"
  rm -rf "$TOOLS"
  if ! python3 -m venv "$TOOLS" >/dev/null \
      || ! "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check \
           "uv==$UV_VERSION"; then
    rm -rf "$TOOLS"
    die "could not install uv into $TOOLS (see the error above); or install uv yourself and put it on PATH"
  fi
}

if command -v uv >/dev/null 2>&1; then
  UV=$(command -v uv)
else
  [ -x "$TOOLS/bin/uv" ] || install_uv
  UV=$TOOLS/bin/uv
fi

# uv may only use a Python that is already here (no download from outside the registries).
export UV_PYTHON_DOWNLOADS=never
"$UV" sync --frozen --quiet \
  || die "uv could not build .venv; it needs Python 3.11 (Debian 12's python3 is 3.11)"

if [ "${CI:-}" = true ]; then
  .venv/bin/planner dev packages --upgrade
else
  .venv/bin/planner dev packages
fi

# PgBouncer: tests/listener/test_pooler.py runs a listener through it in transaction mode, as
# through a hosted project's transaction pooler (port 6543). Only the binary is used: each test
# starts its own pgbouncer as an unprivileged user on a free port.
if [ ! -x /usr/sbin/pgbouncer ]; then
  is_root || die "pgbouncer is missing; install it with: sudo apt-get install -y pgbouncer"
  say "installing pgbouncer from Debian (the pooler tests)"
  apt_install pgbouncer
fi
