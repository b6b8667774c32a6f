# rfloc-serve: the service and its shipped model, run as `rfloc serve` (the README's command).
#
#   docker build -t rfloc-serve:0.1.0 .
#   docker run --rm -p 8000:8000 --shm-size=1g rfloc-serve:0.1.0
#
# The same image is the head and worker image of configs/kuberay/rayservice.yaml, where
# KubeRay replaces the command with `ray start`. See docs/operations.md.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# Must equal the ray pin in pyproject.toml (a test checks): pip refuses a conflicting pair.
ARG RAY_VERSION=2.60.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# wget: KubeRay's default readiness and liveness probes run it inside Ray containers.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --user-group --shell /bin/bash rfloc \
    && install -d -o rfloc -g rfloc /home/rfloc/.rfloc

WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY serve_app/ serve_app/
COPY deployments/ deployments/
COPY configs/ configs/
COPY models/ models/
# Editable on purpose: the app finds configs/ and models/ beside its package (REPO_ROOT), so
# the code stays in /app (root-owned, read-only to the service user) instead of site-packages.
RUN pip install -c requirements.lock -e . "ray[serve,data]==${RAY_VERSION}"

USER 1000:1000
# RFLOC_HTTP_HOST: `rfloc serve` listens on all interfaces of the container (the shipped
# config says 127.0.0.1). Ray's dashboard, GCS and metrics ports stay on loopback.
ENV RFLOC_HTTP_HOST=0.0.0.0 \
    RFLOC_STATE_DIR=/home/rfloc/.rfloc
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD wget -q -O /dev/null http://127.0.0.1:8000/health || exit 1
CMD ["rfloc", "serve"]
