#!/usr/bin/env bash
# Stops a run started with launch.sh on every worker (by its recorded pid).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: stop.sh --name NAME --zone ZONE [options]

Sends a signal to the process launch.sh recorded in LOG_DIR/TAG-<host>.pid
on every worker, waits up to 60 s for it to exit, and removes the pid file.
Only that process is signalled (its reward workers exit with it). A TPU held
by a leftover process cannot be opened by the next run, so stop a run before
launching another on the same slice.

Options:
  --signal SIG        TERM (default), INT or KILL
  --log-dir PATH      log directory on the workers (default: jaxent-logs)
  --tag TAG           as given to launch.sh (default: jaxent)
  --project PROJECT   Google Cloud project (default: gcloud's configured one)
  --internal-ip       reach the workers by their internal IPs
  --dry-run           print every command instead of running it
  -h, --help          this help
EOF
}

SIGNAL=TERM
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
    --signal) need_value "$1" "$#" "${2-}"; SIGNAL=$2; shift 2 ;;
    --log-dir) need_value "$1" "$#" "${2-}"; LOG_DIR=$2; shift 2 ;;
    --tag) need_value "$1" "$#" "${2-}"; TAG=$2; shift 2 ;;
    --internal-ip) INTERNAL_IP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done

check_target
case $SIGNAL in
  TERM | INT | KILL) ;;
  *) die "--signal '$SIGNAL' must be TERM, INT or KILL" ;;
esac
check_path "$LOG_DIR" --log-dir
[[ $TAG =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "--tag '$TAG' may only hold letters, digits and _ . -"
require_gcloud

pidfile="$(remote_path "$LOG_DIR")/$TAG-\$(hostname).pid"
# alive: the process exists and is not a zombie (a container without an init
# may never reap it).
remote="alive() { kill -0 \"\$1\" 2>/dev/null && ! ps -o stat= -p \"\$1\" | grep -q '^Z'; }
pid=$pidfile
if [ ! -f \"\$pid\" ]; then echo \"\$(hostname): no $TAG pid file\"; exit 0; fi
p=\$(cat \"\$pid\")
if alive \"\$p\"; then
  kill -s $SIGNAL \"\$p\"
  for _ in \$(seq 300); do alive \"\$p\" || break; sleep 0.2; done
  if alive \"\$p\"; then echo \"\$(hostname): pid \$p still running after 60 s (try --signal KILL)\" >&2; exit 1; fi
  echo \"\$(hostname): stopped pid \$p\"
else
  echo \"\$(hostname): pid \$p was not running\"
fi
rm -f \"\$pid\""
tpu_ssh all "$remote"
