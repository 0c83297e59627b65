#!/usr/bin/env bash
# Creates a Cloud TPU VM slice (v5p or v6e) for jaxent.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: create.sh --name NAME --zone ZONE --accelerator-type TYPE [options]

Creates a TPU VM slice. By default through a queued resource (the way Google
allocates v5p and v6e capacity: the request waits in the zone's queue until
the slice can be provisioned); --mode direct calls `tpu-vm create`, which
fails at once when there is no capacity.

Required:
  --name NAME               slice name (also the queued-resource id)
  --zone ZONE               e.g. us-east5-a (v5p), europe-west4-a (v6e)
  --accelerator-type TYPE   v5p-N (N TensorCores = N/2 chips, N a multiple of 8:
                            v5p-8, v5p-64, v5p-128, ...) or v6e-N (N chips:
                            1, 4, 8, 16, 32, 64, 128, 256)

Options:
  --runtime-version V   TPU software version (default: v2-alpha-tpuv5 for v5p,
                        v2-alpha-tpuv6e for v6e)
  --project PROJECT     Google Cloud project (default: gcloud's configured one)
  --spot                Spot capacity (cheaper; may be preempted at any time)
  --preemptible         legacy preemptible VMs (--mode direct only)
  --reserved            use the project's reserved capacity
  --mode MODE           queued (default) or direct
  --wait                (queued) poll until the slice is ACTIVE
  --wait-timeout SEC    give up waiting after SEC seconds (default 3600)
  --dry-run             print every command instead of running it
  -h, --help            this help

Example:
  tpu_scripts/create.sh --name jaxent-7b --zone us-east5-a \
      --accelerator-type v5p-128 --spot --wait --dry-run
EOF
}

ACCEL=""
RUNTIME=""
SPOT=0
PREEMPTIBLE=0
RESERVED=0
MODE=queued
WAIT=0
WAIT_TIMEOUT=3600

while (($#)); do
  split_equals "$@"
  set -- "${SPLIT[@]}"
  case $1 in
    --name | --zone | --project)
      need_value "$1" "$#" "${2-}"
      common_flag "$1" "$2"
      shift 2
      ;;
    --accelerator-type) need_value "$1" "$#" "${2-}"; ACCEL=$2; shift 2 ;;
    --runtime-version) need_value "$1" "$#" "${2-}"; RUNTIME=$2; shift 2 ;;
    --mode) need_value "$1" "$#" "${2-}"; MODE=$2; shift 2 ;;
    --wait-timeout) need_value "$1" "$#" "${2-}"; WAIT_TIMEOUT=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --wait) WAIT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done

check_name
check_zone
check_project
[[ -n $ACCEL ]] || die "--accelerator-type is required, e.g. v5p-64 or v6e-16"
if [[ $ACCEL =~ ^v5p-([0-9]+)$ ]]; then
  n=${BASH_REMATCH[1]}
  ((n >= 8 && n % 8 == 0)) ||
    die "--accelerator-type '$ACCEL': v5p-N counts TensorCores (2 per chip, 4 chips per host), so N must be a multiple of 8"
  default_runtime=v2-alpha-tpuv5
elif [[ $ACCEL =~ ^v6e-([0-9]+)$ ]]; then
  case ${BASH_REMATCH[1]} in
    1 | 4 | 8 | 16 | 32 | 64 | 128 | 256) ;;
    *) die "--accelerator-type '$ACCEL': v6e slices have 1, 4, 8, 16, 32, 64, 128 or 256 chips" ;;
  esac
  default_runtime=v2-alpha-tpuv6e
else
  die "--accelerator-type '$ACCEL' is not supported: use v5p-N or v6e-N (e.g. v5p-64, v6e-16)"
fi
RUNTIME=${RUNTIME:-$default_runtime}
[[ $RUNTIME =~ ^[a-z0-9][-a-z0-9.]*$ ]] || die "--runtime-version '$RUNTIME' is not a TPU runtime version like $default_runtime"
[[ $MODE == queued || $MODE == direct ]] || die "--mode '$MODE' must be 'queued' or 'direct'"
((SPOT + PREEMPTIBLE + RESERVED <= 1)) || die "--spot, --preemptible and --reserved exclude each other"
if ((PREEMPTIBLE)) && [[ $MODE == queued ]]; then
  die "--preemptible applies to --mode direct only (queued resources use --spot)"
fi
if ((WAIT)) && [[ $MODE == direct ]]; then
  die "--wait applies to --mode queued only (a direct create returns when the slice is ready)"
fi
[[ $WAIT_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--wait-timeout '$WAIT_TIMEOUT' must be a positive number of seconds"
require_gcloud
scope_flags

capacity=()
((SPOT)) && capacity+=(--spot)
((PREEMPTIBLE)) && capacity+=(--preemptible)
((RESERVED)) && capacity+=(--reserved)

if [[ $MODE == direct ]]; then
  run gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}" \
    --accelerator-type="$ACCEL" --version="$RUNTIME" ${capacity[@]+"${capacity[@]}"}
  exit 0
fi

run gcloud compute tpus queued-resources create "$NAME" "${SCOPE[@]}" --node-id="$NAME" \
  --accelerator-type="$ACCEL" --runtime-version="$RUNTIME" ${capacity[@]+"${capacity[@]}"}

if ((WAIT)); then
  describe=(gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}" --format='value(state.state)')
  if ((DRY_RUN)); then
    printf '%s  # repeated every 30 s until it prints ACTIVE\n' "$(quote_all "${describe[@]}")"
    exit 0
  fi
  waited=0
  while :; do
    state=$("${describe[@]}")
    printf '%s: queued resource %s is %s (%ds)\n' "$SCRIPT_NAME" "$NAME" "$state" "$waited" >&2
    case $state in
      ACTIVE) break ;;
      FAILED | SUSPENDED) fail "queued resource $NAME is $state; details: $(quote_all "${describe[@]:0:6}" "${SCOPE[@]}")" ;;
    esac
    ((waited < WAIT_TIMEOUT)) || fail "queued resource $NAME not ACTIVE after ${WAIT_TIMEOUT}s (it stays queued; check again later)"
    sleep 30
    waited=$((waited + 30))
  done
fi
