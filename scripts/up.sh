#!/usr/bin/env bash
# One command from a fresh clone to a running gateway + backend with the
# bundled model: sets up .venv, then runs `tollgate up` (flags pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh backend
exec .venv/bin/tollgate up "$@"
