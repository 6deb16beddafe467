#!/usr/bin/env bash
# Every GPU check of the benchmarks in one call, on one H200, in under 9 minutes.
#
#   bash benchmarks/gpu_wheels.sh          # once, here (network): ml_collections -> ./.whl
#   device run: command="bash benchmarks/gpu_all.sh", carry=[".whl"], timeout_s=600
#   parts only: "bash benchmarks/gpu_all.sh train" or "... forward";
#   some groups: "TRAIN_GROUPS=head,adapter bash benchmarks/gpu_all.sh train"
#   here, to check the flow: SMOKE=1 PYTHON=.venv/bin/python TRAIN_GROUPS=linear OUT=/tmp/g \
#       bash benchmarks/gpu_all.sh      (tiny models on CPU; the 540 s budget still applies)
#
# Writes under $OUT (the device tool's output folder; else benchmarks/results/):
# gpu_train.{json,md,log}, gpu_forward.{json,log}, env.txt. Parts, in priority
# order, with their expected time on an H200 (each process: ~10 s of imports
# and CUDA start; compile times are the big unknowns):
#   env            versions (jax, jaxlib, CUDA, flax, ...)                     ~5 s
#   gpu_train.py   --deadline 330: no group starts after 330 s                ~5.5-7 min
#     info         versions + bf16 matmul peak (8192^3)                         ~20 s
#     full         full tuning b2, b8 (b4 if 8 runs out of memory), 16 = 2x8  ~150-200 s
#     head         head tuning b8, b16                                          ~60 s
#     adapter      adapter tuning b8 + deformable-core stand-in                 ~100-150 s
#     linear       linear probing b8, b16                                       ~45 s
#   gpu_forward.py peak, head-tuning and adapter segmentor forward            ~1.5-2 min
#                  (killed at 540 s into the script, whatever is left)
# A group or part that would start too late is skipped and listed; the rest
# still writes its results.
set -u
cd "$(dirname "$0")/.."
PARTS=${*:-train forward}                       # e.g. `bash benchmarks/gpu_all.sh forward`
TRAIN_GROUPS=${TRAIN_GROUPS:-full,head,adapter,linear}  # gpu_train.py groups, in order
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
start=$SECONDS

if ! $PY -c 'import ml_collections' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "ml_collections is missing: run 'bash benchmarks/gpu_wheels.sh' where pip has network" \
         "and carry .whl" >&2
    exit 2
  fi
fi

SMOKE_FLAG=()
if [ "${SMOKE:-0}" = 1 ]; then   # tiny models on CPU: checks this script's flow only
  SMOKE_FLAG=(--smoke)
elif ! $PY -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")'; then
  echo "gpu_all.sh: jax sees no GPU here; nothing run" >&2
  exit 2
fi

{ $PY -c 'import jax; jax.print_environment_info()'
  $PY -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|orbax|ml.collections|torch|nvidia-cudnn|numpy) '
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ " $PARTS " == *" train "* ]]; then
  timeout 450 $PY benchmarks/gpu_train.py "${SMOKE_FLAG[@]}" --groups "$TRAIN_GROUPS" \
      --deadline 330 --out "$OUT" 2>&1 \
      | tee "$OUT/gpu_train.log"
fi
left=$((540 - (SECONDS - start)))
if [[ " $PARTS " != *" forward "* ]]; then
  :
elif [ "$left" -gt 60 ]; then
  timeout "$left" $PY benchmarks/gpu_forward.py "${SMOKE_FLAG[@]}" --parts peak,head,adapter \
      --timeout 150 \
      --json "$OUT/gpu_forward.json" 2>&1 | tee "$OUT/gpu_forward.log"
else
  echo "gpu_forward.py skipped: ${left} s left of the 540 s budget"
fi
echo "gpu_all.sh: $((SECONDS - start)) s"
