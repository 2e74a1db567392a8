#!/usr/bin/env bash
# Installs everything and runs the main job: the prefill/generation benchmark.
# Extra arguments go to `python -m rwkv_gpu.bench` (e.g. --model PATH, --shape 2.9b).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
exec .venv/bin/python -m rwkv_gpu.bench "$@"
