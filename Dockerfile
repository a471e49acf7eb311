# syntax=docker/dockerfile:1
# CHIAR-Former inference server.
#   CPU (default):  docker build -t chiar-former-serving:0.1.0 .
#   GPU:            docker build --build-arg VARIANT=cuda -t chiar-former-serving:0.1.0-cuda .
# The demo checkpoint checkpoints/chiar-small is baked in at /app/checkpoints/chiar-small; to
# serve another one, mount it and set CHIAR_CHECKPOINT, e.g.
#   docker run -p 8000:8000 -v "$PWD/checkpoints/mine:/models/mine:ro" \
#              -e CHIAR_CHECKPOINT=/models/mine chiar-former-serving:0.1.0
# Python dependencies are installed by deploy/install.sh, the same script CI runs.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# ---- base images: Python 3.11 plus where torch comes from --------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS base-cuda
ARG TORCH_CUDA=cu128
# Ubuntu 22.04 ships Python 3.10; the project needs 3.11 (deadsnakes PPA).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
    && apt-get purge -y software-properties-common gpg-agent \
    && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_CUDA} \
    PYTHON=python3.11

# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- builder: the venv with runtime dependencies and the project ---------------------------
# The native CPU kernels (csrc/) compile here against the image's torch: a C++ compiler and the
# Python headers, in this stage only (the runtime stage copies the built venv).
FROM base AS builder
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md requirements.txt requirements-dev.txt ./
COPY deploy/install.sh deploy/install.sh
COPY csrc/ csrc/
COPY model/ model/
COPY training/ training/
COPY server/ server/
COPY loadtests/ loadtests/
RUN --mount=type=cache,target=/root/.cache/pip bash deploy/install.sh /opt/venv

# ---- runtime: venv + checkpoint, non-root ------------------------------------------------
FROM base AS runtime
LABEL org.opencontainers.image.title="chiar-former-serving" \
      org.opencontainers.image.description="CHIAR-Former inference server with inference-time hard gating" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /app --shell /usr/sbin/nologin app
COPY --from=builder /opt/venv /opt/venv
COPY checkpoints/chiar-small /app/checkpoints/chiar-small
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    CHIAR_CHECKPOINT=/app/checkpoints/chiar-small \
    CHIAR_HOST=0.0.0.0 \
    CHIAR_PORT=8000
WORKDIR /app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CHIAR_PORT', '8000'), timeout=4)"]
CMD ["python", "-m", "server"]
