#!/usr/bin/env bash
# One command from a fresh clone to the whole test suite plus lint and type
# checks. Needs `redis-server` on PATH (tests start their own instances).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh backend,dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "==> ruff" >&2
.venv/bin/ruff check gateway backend tests bench
.venv/bin/ruff format --check gateway backend tests bench
echo "==> mypy" >&2
.venv/bin/mypy gateway backend
echo "==> pytest" >&2
exec .venv/bin/pytest "$@"
