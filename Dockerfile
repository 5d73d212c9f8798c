# syntax=docker/dockerfile:1
#
# batchd image: `docker build -t batchd .` from the repository root.
# Runs `batchd serve` by default; `batchd migrate` for the schema job.
# With BATCHD_HTTP_HOST=0.0.0.0 (set here) serve needs BATCHD_INGEST_TOKENS.
# The base is pinned to a patch release; pin it to a digest too where the
# registry is reachable (`docker buildx imagetools inspect` prints it):
#   docker build --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Dependencies first: this layer is reused until the lock file changes.
COPY requirements.lock ./
RUN pip install -r requirements.lock

# pyproject.toml names README.md as the package readme, so it is needed to
# build; migrations/ is packaged beside batchd/ so `batchd migrate` finds it.
COPY pyproject.toml README.md ./
COPY batchd ./batchd
COPY migrations ./migrations
RUN pip install --no-deps . \
    && python -m compileall -q /opt/venv/lib

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

# tini is PID 1: it forwards SIGTERM to batchd (which drains) and reaps
# children such as the embedded PostgreSQL when no database URL is given.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid/gid so Kubernetes can check runAsNonRoot.
RUN groupadd --system --gid 10001 batchd \
    && useradd --system --uid 10001 --gid batchd --no-create-home \
       --home-dir /var/lib/batchd --shell /usr/sbin/nologin batchd \
    && install -d -o batchd -g batchd -m 0750 /var/lib/batchd

COPY --from=builder /opt/venv /opt/venv

WORKDIR /var/lib/batchd

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/batchd \
    BATCHD_DATA_DIR=/var/lib/batchd \
    BATCHD_HTTP_HOST=0.0.0.0 \
    BATCHD_HTTP_PORT=8080

USER 10001:10001

EXPOSE 8080

# Liveness only (/healthz never touches the database); urllib avoids curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('BATCHD_HTTP_PORT', '8080') + '/healthz', timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--", "batchd"]
CMD ["serve"]
