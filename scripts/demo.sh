#!/usr/bin/env bash
# The main job: sets up ./.venv if needed, then trains and evaluates configs/demo.py
# on CPU. Usage: bash scripts/demo.sh [WORKDIR] [--config.KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
workdir=${1:-/tmp/internseg_demo}
shift || true
exec .venv/bin/python -m internseg_jax.main --config=configs/demo.py --workdir="$workdir" "$@"
