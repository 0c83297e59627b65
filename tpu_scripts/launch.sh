#!/usr/bin/env bash
# Starts the same jaxent command on every worker of a slice, in the background.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch.sh --name NAME --zone ZONE [options] -- JAXENT_ARGS...

Runs `jaxent JAXENT_ARGS...` on every worker at once, under nohup, from the
source directory, with stdout and stderr in LOG_DIR/TAG-<worker host>.log and
the process id in LOG_DIR/TAG-<worker host>.pid. A multi-host TPU program
must run on all workers together: jaxent calls jax.distributed.initialize(),
which finds the other workers from the TPU metadata, and only process 0 logs
metrics and writes reports. Refuses to start where TAG is still running
(stop it with stop.sh).

Options:
  --project PROJECT   Google Cloud project (default: gcloud's configured one)
  --workdir PATH      source directory on the workers (default: jaxent)
  --venv PATH         virtual environment on the workers (default: jaxent-venv)
  --log-dir PATH      log directory on the workers (default: jaxent-logs)
  --tag TAG           names the log and pid files (default: jaxent)
  --env KEY=VALUE     environment variable for the run (repeatable), e.g.
                      --env JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache
  --internal-ip       reach the workers by their internal IPs
  --dry-run           print every command instead of running it
  -h, --help          this help

Checkpoints of a multi-host run must go to storage that every worker can
reach (pass --run-dir to `jaxent train`; see docs/SCALE_OUT.md).

Example:
  tpu_scripts/launch.sh --name jaxent-7b --zone us-east5-a --tag kl-cov -- \
      train configs/paper/qwen2.5-7b-kl-cov.yaml --run-dir /mnt/shared/runs/kl-cov
EOF
}

WORKDIR=jaxent
VENV=jaxent-venv
LOG_DIR=jaxent-logs
TAG=jaxent
ENVS=()
ARGS=()

while (($#)); do
  if [[ $1 == -- ]]; then
    shift
    ARGS=("$@")
    break
  fi
  split_equals "$@"
  set -- "${SPLIT[@]}"
  case $1 in
    --name | --zone | --project)
      need_value "$1" "$#" "${2-}"
      common_flag "$1" "$2"
      shift 2
      ;;
    --workdir) need_value "$1" "$#" "${2-}"; WORKDIR=$2; shift 2 ;;
    --venv) need_value "$1" "$#" "${2-}"; VENV=$2; shift 2 ;;
    --log-dir) need_value "$1" "$#" "${2-}"; LOG_DIR=$2; shift 2 ;;
    --tag) need_value "$1" "$#" "${2-}"; TAG=$2; shift 2 ;;
    --env)
      need_value "$1" "$#" "${2-}"
      [[ $2 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$2' must be KEY=VALUE with KEY a variable name"
      ENVS+=("$2")
      shift 2
      ;;
    --internal-ip) INTERNAL_IP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (the jaxent command goes after --)" ;;
  esac
done

check_target
check_path "$WORKDIR" --workdir
check_path "$VENV" --venv
check_path "$LOG_DIR" --log-dir
[[ $TAG =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]] || die "--tag '$TAG' may only hold letters, digits and _ . -"
((${#ARGS[@]})) || die "no jaxent command: put it after --, e.g. -- train configs/paper/qwen2.5-7b-grpo.yaml"
[[ ${ARGS[0]} != -* ]] || die "the jaxent command after -- must start with a subcommand (train, eval, ...), got '${ARGS[0]}'"
require_gcloud

logs=$(remote_path "$LOG_DIR")
cmd_words="$(remote_path "$VENV")/bin/jaxent $(quote_all "${ARGS[@]}")"
if ((${#ENVS[@]})); then
  cmd_words="env $(quote_all "${ENVS[@]}") $cmd_words"
fi

# One script for every worker; $(hostname) tells the workers' files apart.
remote="set -e
mkdir -p $logs
log=$logs/$TAG-\$(hostname).log
pid=$logs/$TAG-\$(hostname).pid
p=\$(cat \"\$pid\" 2>/dev/null || true)
if [ -n \"\$p\" ] && kill -0 \"\$p\" 2>/dev/null && ! ps -o stat= -p \"\$p\" | grep -q '^Z'; then
  echo \"\$(hostname): $TAG is already running (pid \$p); stop it first\" >&2
  exit 1
fi
cd $(remote_path "$WORKDIR")
setsid nohup $cmd_words >\"\$log\" 2>&1 </dev/null &
echo \$! >\"\$pid\"
echo \"\$(hostname): started pid \$!, log \$log\""
tpu_ssh all "$remote"
