#!/usr/bin/env bash
# One prepared script for a GPU machine (issue 16); finishes in under 8 minutes there.
#
#   bash bench/device_suite.sh            # on the accelerator
#   bash bench/device_suite.sh --dry-run  # the same steps, tiny sizes, on CPU (tested)
#
# Steps: (1) continuous vs static rollout engine on long-tailed budgets, a
# 135M Llama, 8 x 8 rows (median 64, cap 512), wall time, tokens/s,
# utilisation, identical rows, generating in bfloat16 (float32 master
# weights); (2) decode tokens/s of the static sampler
# against the memory-bandwidth limit (bench/sampler.py prints the measured
# copy bandwidth and the limit); (3) the loss benchmark (PPO-clip, Clip-Cov,
# KL-Cov). Each step runs under `timeout` so one stuck step cannot eat the
# machine's time; the suite goes on and reports each step's exit status.
# Not yet here: update-step MFU for a 0.5B Qwen2-shaped model in bfloat16
# (bench/train_step.py has no such shape).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  ENGINE_ARGS="--prompts 2 --samples 2 --median 4 --max-new 8 --slots 2 --repeats 1 --compute-dtype bfloat16"
  LOSS_ARGS="--batch 4 --time 64 --reps 1 --inner 1 --cache warm"
  STEP_TIMEOUT=120
else
  ENGINE_ARGS="--model 135m --median 64 --max-new 512 --slots 16 --compute-dtype bfloat16"
  LOSS_ARGS=""
  STEP_TIMEOUT=200
fi

status=0
step() {  # step NAME COMMAND...
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$STEP_TIMEOUT" "$@"
  local rc=$?
  echo "=== $name: exit $rc, $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || status=1
}

"$PY" -c "import jax; print('devices:', jax.devices())"
step rollout_engine "$PY" bench/rollout_engine.py $ENGINE_ARGS
if [ "$DRY" = 0 ]; then
  step rollout_engine_uniform "$PY" bench/rollout_engine.py $ENGINE_ARGS --uniform --max-new 256
  step decode_bandwidth "$PY" bench/sampler.py --batches 64 --new-tokens 256 --skip-hf
fi
step losses "$PY" bench/losses.py $LOSS_ARGS
exit $status
