#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, then runs the whole suite on CPU
# with 8 fake devices (tests/conftest.py sets XLA_FLAGS). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/python -m pytest -q --durations=30 tests "$@"
