#!/usr/bin/env bash
# Entry point of the GPU backend image: one of two servers, chosen by
# TOLLGATE_GPU_SERVER; the container's arguments (CMD) are appended to it.
#
#   tollgate (default)  tollgate backend --engine "$TOLLGATE_ENGINE" --device "$TOLLGATE_DEVICE"
#                         --served-name "$TOLLGATE_SERVED_NAME" [--model "$TOLLGATE_MODEL"]
#                       Tollgate's backend; TOLLGATE_ENGINE is tensorrt_llm in this image
#                       (set it empty for the built-in torch engine). Probes: /health and
#                       /ready. Gateway pool kind: tollgate.
#   trtllm-serve        trtllm-serve "$TOLLGATE_MODEL" --backend pytorch
#                       NVIDIA's own OpenAI-compatible server; TOLLGATE_MODEL is required.
#                       Probe: /health. Gateway pool kind: trtllm. Pass its own options
#                       as arguments, e.g. --served_model_name smollm2 --max_batch_size 64.
#
# Both listen on TOLLGATE_BACKEND_HOST:TOLLGATE_BACKEND_PORT (0.0.0.0:8081).
set -euo pipefail

server="${TOLLGATE_GPU_SERVER:-tollgate}"
host="${TOLLGATE_BACKEND_HOST:-0.0.0.0}"
port="${TOLLGATE_BACKEND_PORT:-8081}"
model="${TOLLGATE_MODEL:-}"

case "$server" in
    tollgate)
        args=(backend --host "$host" --port "$port" --device "${TOLLGATE_DEVICE:-cuda}")
        args+=(--served-name "${TOLLGATE_SERVED_NAME:-smollm2}")
        if [ -n "${TOLLGATE_ENGINE:-}" ]; then
            args+=(--engine "$TOLLGATE_ENGINE")
        fi
        if [ -n "$model" ]; then
            args+=(--model "$model")
        fi
        exec tollgate "${args[@]}" "$@"
        ;;
    trtllm-serve)
        if [ -z "$model" ]; then
            echo "backend-gpu: TOLLGATE_GPU_SERVER=trtllm-serve needs TOLLGATE_MODEL" \
                "(a Hugging Face or ModelOpt checkpoint folder)" >&2
            exit 2
        fi
        exec trtllm-serve "$model" --host "$host" --port "$port" --backend pytorch "$@"
        ;;
    *)
        echo "backend-gpu: unknown TOLLGATE_GPU_SERVER=$server (tollgate or trtllm-serve)" >&2
        exit 2
        ;;
esac
