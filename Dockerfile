# The listener's image: `planner listen` as a non-root user, the engine's wheel and its production
# dependencies only (no dev stand-in, no dev tools). docs/deploy.md#container says how to run it.
# Linted by `make lint` (hadolint); tests/foundation/test_container.py runs the same build script
# and starts the result as a non-root user, since CI has no Docker daemon.
#
#   docker build -t planner-engine .
#   docker run --env-file planner.env -p 8080:8080 planner-engine

# -- build: the engine's wheel, installed into /opt/planner at uv.lock's versions ---------------
FROM python:3.11-slim-bookworm AS build
# uv from PyPI, at the version scripts/bootstrap.sh pins.
RUN pip install --no-cache-dir uv==0.13.9
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
WORKDIR /src
# What uv needs to build the engine and read the lock (the workspace member's pyproject only).
COPY pyproject.toml uv.lock README.md ./
COPY devstack/pyproject.toml devstack/pyproject.toml
COPY listener listener
COPY solver solver
COPY migrations migrations
COPY scripts/build-venv.sh scripts/build-venv.sh
RUN UV=/usr/local/bin/uv scripts/build-venv.sh /opt/planner /usr/local/bin/python3.11

# -- run: the virtualenv alone, as an unprivileged user ----------------------------------------
FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin planner
COPY --from=build /opt/planner /opt/planner
ENV PATH=/opt/planner/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PLANNER_LOG_FORMAT=json
USER 10001
# The health server listens on $PORT when the platform sets it, else PLANNER_HEALTH_PORT (8080).
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('PLANNER_HEALTH_PORT') or os.environ.get('PORT') or '8080'; urllib.request.urlopen(f'http://127.0.0.1:{port}/livez', timeout=4)"]
# SIGTERM (docker stop) drains: the running solve finishes within PLANNER_SHUTDOWN_GRACE_S.
STOPSIGNAL SIGTERM
CMD ["planner", "listen"]
