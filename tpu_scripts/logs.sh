#!/usr/bin/env bash
# Follows the logs of a run started with launch.sh.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: logs.sh --name NAME --zone ZONE [options]

Prints the last lines of LOG_DIR/TAG-<host>.log and follows it (tail -F)
on worker 0 (process 0 writes the progress and metrics lines) or on every
worker (--worker all: each line prefixed with the worker's host name).
Ctrl-C stops following; the run goes on.

Options:
  --worker W          worker index or 'all' (default: 0)
  --lines N           lines of history to print first (default: 100)
  --no-follow         print and exit
  --log-dir PATH      log directory on the workers (default: jaxent-logs)
  --tag TAG           as given to launch.sh (default: jaxent)
  --project PROJECT   Google Cloud project (default: gcloud's configured one)
  --internal-ip       reach the workers by their internal IPs
  --dry-run           print every command instead of running it
  -h, --help          this help
EOF
}

WORKER=0
LINES=100
FOLLOW=1
LOG_DIR=jaxent-logs
TAG=jaxent

while (($#)); do
  split_equals "$@"
  set -- "${SPLIT[@]}"
  case $1 in
    --name | --zone | --project)
      need_value "$1" "$#" "${2-}"
      common_flag "$1" "$2"
      shift 2
      ;;
    --worker) need_value "$1" "$#" "${2-}"; WORKER=$2; shift 2 ;;
    --lines) need_value "$1" "$#" "${2-}"; LINES=$2; shift 2 ;;
    --no-follow) FOLLOW=0; shift ;;
    --log-dir) need_value "$1" "$#" "${2-}"; LOG_DIR=$2; shift 2 ;;
    --tag) need_value "$1" "$#" "${2-}"; TAG=$2; shift 2 ;;
    --internal-ip) INTERNAL_IP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done

check_target
check_worker "$WORKER" --worker
[[ $LINES =~ ^(0|[1-9][0-9]*)$ ]] || die "--lines '$LINES' must be a non-negative integer"
check_path "$LOG_DIR" --log-dir
[[ $TAG =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "--tag '$TAG' may only hold letters, digits and _ . -"
require_gcloud

log="$(remote_path "$LOG_DIR")/$TAG-\$(hostname).log"
tail_cmd="tail -n $LINES"
((FOLLOW)) && tail_cmd+=" -F"
remote="$tail_cmd $log"
if [[ $WORKER == all ]]; then
  # Interleaved output from many workers is only readable with a prefix.
  remote="h=\$(hostname); $tail_cmd $log | sed -u \"s/^/\$h: /\""
fi
tpu_ssh "$WORKER" "$remote"
