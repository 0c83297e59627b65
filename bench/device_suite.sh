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
# copy bandwidth and the limit); (3) update-step MFU of a random
# Qwen2.5-0.5B-shaped model, bfloat16 compute over float32 master weights and
# AdamW state (bench/train_step.py --mfu: step time, tokens/s, model FLOPs,
# TFLOP/s, the device's peak, MFU; target >= 40%); (4) the loss benchmark
# (PPO-clip, Clip-Cov, KL-Cov). Each step runs under `timeout` so one stuck
# step cannot eat the machine's time; the suite goes on and reports each
# step's exit status.
#
# MFU shape: B=4 rows x (P=512 + R=1536) = 8192 tokens, no remat. Memory on
# an 80 GB H100: the float32 parameters (494M x 4 B = 1.8 GiB) and AdamW m, v
# (3.7 GiB) are the step's 5.5 GiB of arguments, donated, so the new state
# reuses them; the temporaries (gradients, the activations kept for the
# backward pass, the logits and attention chunks) grow with the rows:
# XLA:CPU's memory_analysis of this very program gives 33 GiB at B=4, 63 GiB
# at B=8 and 122 GiB at B=16 (14 GiB at B=16 with --remat), ~3.7 GiB per
# 2048-token row. B=4 needs ~39 GiB by that estimate, inside the ~60 GiB jax
# preallocates on an 80 GB card (75%), with room for the GPU's workspaces;
# B=8 (~69 GiB) would not fit there. Time: 2.5e13 model FLOPs a step, 63 ms
# at 40% of 989 TFLOP/s; compiling (one scanned layer) well under a minute;
# 21 steps 1-4 s: so the step adds about a minute to the suite, at most
# 120 s (its timeout).
#
# Time: every step has its own limit, and no step may run past the suite's
# deadline (SUITE_S, 450 s on the accelerator): a step's limit is the smaller
# of its own and what is left, and a step with under 10 s left is skipped and
# reported as such, so the suite ends within 7.5 minutes plus one step's exit.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  ENGINE_ARGS="--prompts 2 --samples 2 --median 4 --max-new 8 --slots 2 --repeats 1 --compute-dtype bfloat16"
  LOSS_ARGS="--batch 4 --time 64 --reps 1 --inner 1 --cache warm"
  MFU_ARGS="--mfu --model demo-0.12M --reps 2"
  STEP_TIMEOUT=120
  MFU_TIMEOUT=120
  SUITE_S=${SUITE_S:-600}
else
  ENGINE_ARGS="--model 135m --median 64 --max-new 512 --slots 16 --compute-dtype bfloat16"
  LOSS_ARGS=""
  MFU_ARGS="--mfu --model qwen2-0.5B --batch 4 --prompt 512 --response 1536 --reps 20"
  STEP_TIMEOUT=100
  MFU_TIMEOUT=120
  SUITE_S=${SUITE_S:-450}
fi
DEADLINE=$((SECONDS + SUITE_S))

status=0
step() {  # [LIMIT=seconds] step NAME COMMAND...
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  local limit=${LIMIT:-$STEP_TIMEOUT}
  local left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: skipped, ${left} s left of the suite's ${SUITE_S} s"
    status=1
    return
  fi
  timeout "$limit" "$@"
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
LIMIT=$MFU_TIMEOUT step train_mfu "$PY" bench/train_step.py $MFU_ARGS
step losses "$PY" bench/losses.py $LOSS_ARGS
exit $status
