# The two commands a newcomer needs:  `make demo`  and  `make test`.
# Both bootstrap everything on a fresh machine: uv, the virtualenv and the Debian packages
# (scripts/bootstrap.sh; with CI=true it upgrades the packages to apt's newest candidates);
# `make test` also installs the conformance tests' npm packages (scripts/install-js.sh).

VENV    := .venv
PLANNER := $(VENV)/bin/planner
PYTEST_ARGS ?=

.PHONY: help bootstrap js up down status demo test test-fast lint typecheck pytest chaos bench clean

help:
	@echo "make demo   - run the main job on the local stack (bootstraps everything)"
	@echo "make test   - ruff + import contracts + mypy + the whole test suite on the real local stack"
	@echo "make test-fast - the tests that need no stack (< 1 min): solver, executor, units"
	@echo "make up     - start the local stack (PostgreSQL 15 + pg_cron + wal2json + Realtime)"
	@echo "make down   - stop the local stack (data kept)"
	@echo "make bench  - print the benchmark tables"

bootstrap:
	@bash scripts/bootstrap.sh

js:
	@bash scripts/install-js.sh

up: bootstrap
	@$(PLANNER) dev up

down:
	@if [ -x $(PLANNER) ]; then $(PLANNER) dev down; fi

status: bootstrap
	@$(PLANNER) dev status

demo: up
	@$(PLANNER) demo

# Ruff, then the import contracts of pyproject.toml (the engine never imports devstack), then
# hadolint on the container image's Dockerfile.
lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/hadolint Dockerfile

typecheck: bootstrap
	$(VENV)/bin/mypy

pytest: up js
	$(VENV)/bin/pytest -n 2 $(PYTEST_ARGS)

test: lint typecheck pytest

# The inner loop: everything that needs no stack (solver, executor state machine on in-memory
# ports, pure units), well under a minute. `make test` still runs all of it and the rest.
test-fast: bootstrap
	$(VENV)/bin/pytest -m "not stack" -q $(PYTEST_ARGS)

bench: up
	$(VENV)/bin/python bench/solver_bench.py --quick

clean: down
	rm -rf .devstack .venv .tools .mypy_cache .ruff_cache .pytest_cache .import_linter_cache

# The fault campaign (docs/reliability.md): a throw-away stack on ports 54349/54350, ~20 min.
chaos: bootstrap
	$(VENV)/bin/python -m tests.chaos.campaign --reps $${CHAOS_REPS:-20}
