#!/usr/bin/env bash
# Prepares ./.whl for benchmarks/gpu_all.sh on a machine without network access:
# the device image (KINDS.md: python3 with jax, flax, optax, orbax, opencv, torch)
# lacks ml_collections, which the configs need. Run here, in the repository root,
# where pip can reach PyPI; then carry `.whl` to the GPU machine (it is gitignored).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(grep -E '^ml-collections==' requirements.txt | cut -d= -f3)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "ml-collections==${version}"
ls -l .whl
