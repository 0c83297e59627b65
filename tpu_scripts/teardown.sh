#!/usr/bin/env bash
# Deletes a TPU VM slice (and its queued resource).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: teardown.sh --name NAME --zone ZONE [options]

Deletes the slice and everything on its disks (copy checkpoints off first).
Asks for confirmation on the terminal unless --yes is given.

Options:
  --mode MODE         queued (default: deletes the queued resource and its
                      slice) or direct (a slice made with create.sh --mode direct)
  --yes               do not ask
  --async             return without waiting for the deletion to finish
  --project PROJECT   Google Cloud project (default: gcloud's configured one)
  --dry-run           print every command instead of running it
  -h, --help          this help
EOF
}

MODE=queued
YES=0
ASYNC=0

while (($#)); do
  split_equals "$@"
  set -- "${SPLIT[@]}"
  case $1 in
    --name | --zone | --project)
      need_value "$1" "$#" "${2-}"
      common_flag "$1" "$2"
      shift 2
      ;;
    --mode) need_value "$1" "$#" "${2-}"; MODE=$2; shift 2 ;;
    --yes | -y) YES=1; shift ;;
    --async) ASYNC=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done

check_target
[[ $MODE == queued || $MODE == direct ]] || die "--mode '$MODE' must be 'queued' or 'direct'"
require_gcloud
scope_flags

what="TPU slice '$NAME' in $ZONE${PROJECT:+ (project $PROJECT)}"
if ((!YES && !DRY_RUN)); then
  printf 'Delete %s and everything on its disks? [y/N] ' "$what" >&2
  answer=""
  read -r answer || true
  case $answer in
    y | Y | yes | YES) ;;
    *) fail "not deleted: $what" ;;
  esac
fi

extra=(--quiet)  # our own prompt replaced gcloud's
((ASYNC)) && extra+=(--async)
if [[ $MODE == queued ]]; then
  # --force deletes the slice the queued resource holds along with it.
  run gcloud compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force "${extra[@]}"
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" "${extra[@]}"
fi
