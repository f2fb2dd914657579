# syntax=docker/dockerfile:1
#
# The Tollgate gateway: the base package only (no torch, no backend code),
# run as an unprivileged numeric user.
#
#   docker build -f deploy/docker/gateway.Dockerfile -t tollgate-gateway .
#
# Build from the repository root; gateway.Dockerfile.dockerignore (read by
# BuildKit next to this file) keeps the context to the files copied below.
#
# Mount the policy files at /etc/tollgate/tenants and /etc/tollgate/policies
# (TOLLGATE_TENANTS_DIR, TOLLGATE_POLICIES_DIR) and give it a JWT key
# (TOLLGATE_JWT_HS_SECRET_FILE, TOLLGATE_JWT_PUBLIC_KEY_FILES or
# TOLLGATE_JWT_JWKS_URL); arguments after the image name go to
# `tollgate gateway` (for example --workers 4 with TOLLGATE_STORE=redis).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tollgate
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
# The base package only: no extras, so no torch.
RUN /opt/tollgate/bin/pip install /src

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 tollgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/tollgate --create-home \
        --shell /usr/sbin/nologin tollgate \
 && mkdir -p /etc/tollgate/tenants /etc/tollgate/policies /var/lib/tollgate/ledger \
 && chown -R 10001:10001 /var/lib/tollgate
COPY --from=build /opt/tollgate /opt/tollgate
ENV PATH=/opt/tollgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOLLGATE_HOST=0.0.0.0 \
    TOLLGATE_PORT=8080 \
    TOLLGATE_TENANTS_DIR=/etc/tollgate/tenants \
    TOLLGATE_POLICIES_DIR=/etc/tollgate/policies \
    TOLLGATE_LEDGER_DIR=/var/lib/tollgate/ledger
USER 10001:10001
WORKDIR /home/tollgate
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('TOLLGATE_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["tollgate", "gateway"]
