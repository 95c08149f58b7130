#!/usr/bin/env bash
# Build the production virtualenv of the engine at $1: the engine's wheel (`uv build`), installed
# with exactly the versions of uv.lock for its production dependencies (no dev group, no dev
# stand-in). The Dockerfile's build stage runs this script; tests/foundation/test_container.py
# runs it too and starts `planner listen` from the result as a non-root user, so the image's
# steps are tested on a machine without Docker.
#   usage: scripts/build-venv.sh TARGET_VENV [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:?usage: scripts/build-venv.sh TARGET_VENV [PYTHON]}
python=${2:-python3.11}
uv=${UV:-$(command -v uv || echo .tools/uv/bin/uv)}
export UV_PYTHON_DOWNLOADS=never
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$uv" build --package planner-engine --wheel --out-dir "$work/dist" --quiet
"$uv" export --frozen --no-dev --package planner-engine --no-emit-workspace --no-hashes \
  --no-header --no-annotate --output-file "$work/constraints.txt" --quiet
"$uv" venv --quiet --python "$python" "$target"
"$uv" pip install --quiet --python "$target/bin/python" --constraint "$work/constraints.txt" \
  "$work"/dist/planner_engine-*.whl
