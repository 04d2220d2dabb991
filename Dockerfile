# syntax=docker/dockerfile:1
# carryover, CPU image:   docker build -t carryover .
# The GPU image is docker/Dockerfile.cuda. Runtime dependencies only (no torch, no dev tools),
# the bundled demo model inside, a non-root user, configured by CARRYOVER_* variables.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with carryover and its runtime dependencies -----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/carryover
COPY pyproject.toml README.md ./
COPY service ./service
COPY model_export ./model_export
# A regular (not editable) install, so the venv stands alone; the bundled model is package data.
# Every dependency ships binary wheels: no compiler is needed, even here.
RUN /opt/carryover/bin/pip install --no-cache-dir .

# ---- final: the interpreter, the venv, nothing else ----------------------------------------
FROM ${PYTHON_IMAGE}
RUN useradd --system --no-log-init --uid 10001 --user-group \
        --home-dir /var/lib/carryover --create-home --shell /usr/sbin/nologin carryover
COPY --from=build /opt/carryover /opt/carryover
COPY docker/healthcheck.py /opt/carryover/healthcheck.py
ENV PATH=/opt/carryover/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CARRYOVER_PORT=8000 \
    CARRYOVER_DATA_DIR=/var/lib/carryover/data
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /var/lib/carryover
EXPOSE 8000
# Ready = models loaded and Redis answering; a draining replica answers 503 and turns unhealthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/opt/carryover/healthcheck.py"]
# SIGTERM drains: new work is refused, queued batches finish and are written, WebSockets get 1012.
STOPSIGNAL SIGTERM
ENTRYPOINT ["carryover", "serve", "--host", "0.0.0.0"]
