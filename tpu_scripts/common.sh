# shellcheck shell=bash
# Helpers shared by the tpu_scripts (sourced, never run on its own).
#
# Every script parses its own flags, then calls `run CMD ARGS...` for each
# command that touches the cloud or the disk. With --dry-run, `run` prints the
# command (quoted so that it can be pasted into a shell) and does not run it;
# otherwise it echoes `+ CMD` to stderr and runs it. Bad arguments exit with
# status 2 and a message naming the flag; a failed command exits non-zero.
#
# Flags every script shares (values may also come from the environment, so a
# session can export them once):
#   --name NAME        TPU VM / queued-resource name   (env JAXENT_TPU_NAME)
#   --zone ZONE        e.g. us-east5-a                 (env JAXENT_TPU_ZONE)
#   --project PROJECT  Google Cloud project id         (env JAXENT_TPU_PROJECT;
#                      default: gcloud's configured project)
#   --internal-ip      ssh/scp to the workers' internal IPs (from a VM in the
#                      same VPC network)
#   --dry-run          print every command instead of running it
#
# Written for bash 3.2 and later (macOS's /bin/bash too): a possibly empty
# array is expanded as ${a[@]+"${a[@]}"}, which `set -u` accepts everywhere.

SCRIPT_NAME=$(basename "$0")
DRY_RUN=0
NAME=${JAXENT_TPU_NAME:-}
ZONE=${JAXENT_TPU_ZONE:-}
PROJECT=${JAXENT_TPU_PROJECT:-}
INTERNAL_IP=0

# Bad usage: a message naming the argument, exit status 2.
die() {
  printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$SCRIPT_NAME" >&2
  exit 2
}

# A failure that is not the caller's usage (missing tool, refused prompt).
fail() {
  printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2
  exit 1
}

# quote ARG: ARG as one shell word (bare when it needs no quoting; a
# --flag=value keeps the flag outside the quotes, for the reader).
quote() {
  local s=$1 q="'\\''"
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9-]+=)(.+)$ ]]; then
    s=${BASH_REMATCH[2]}
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${s//\'/$q}"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# quote_all ARGS...: the arguments as one shell command line.
quote_all() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(quote "$a")"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: print it (--dry-run) or echo it to stderr and run it.
run() {
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_all "$@")"
  else
    printf '+ %s\n' "$(quote_all "$@")" >&2
    "$@"
  fi
}

# need_value FLAG ARGC [VALUE]: FLAG must be followed by a non-empty value.
need_value() {
  if (($2 < 2)) || [[ -z ${3-} || ${3-} == --* ]]; then
    die "$1 needs a value"
  fi
}

# split_equals "$@": rewrites a leading --flag=value into --flag value; the
# result is in SPLIT (an array), so callers do: split_equals "$@"; set -- "${SPLIT[@]}"
# shellcheck disable=SC2034  # SPLIT is read by the caller
split_equals() {
  SPLIT=("$@")
  if [[ ${1-} == --*=* ]]; then
    SPLIT=("${1%%=*}" "${1#*=}" "${@:2}")
  fi
}

# common_flag FLAG VALUE: stores one of the shared valued flags.
common_flag() {
  case $1 in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    *) die "internal: common_flag $1" ;;
  esac
}

# Name rules of Compute Engine resources: lower-case letters, digits and
# hyphens, starting with a letter, at most 63 characters.
check_name() {
  [[ -n $NAME ]] || die "--name is required (or set JAXENT_TPU_NAME)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name '$NAME' is not a valid TPU name (lower-case letters, digits and hyphens, starting with a letter, at most 63 characters)"
}

check_zone() {
  [[ -n $ZONE ]] || die "--zone is required (or set JAXENT_TPU_ZONE), e.g. us-east5-a"
  [[ $ZONE =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "--zone '$ZONE' is not a zone name like us-east5-a or europe-west4-b"
}

# Project ids: 6-30 characters, lower-case letters, digits and hyphens,
# starting with a letter (optionally prefixed by a domain, "example.com:id").
check_project() {
  [[ -z $PROJECT ]] && return 0
  [[ $PROJECT =~ ^([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$ ]] ||
    die "--project '$PROJECT' is not a Google Cloud project id"
}

# The checks every script that talks to an existing slice needs.
check_target() {
  check_name
  check_zone
  check_project
}

# check_worker VALUE FLAG: "all" or a worker index.
check_worker() {
  [[ $1 == all || $1 =~ ^(0|[1-9][0-9]*)$ ]] || die "$2 '$1' must be 'all' or a worker index (0, 1, ...)"
}

# check_path VALUE FLAG: a path on the workers (absolute, or relative to the
# worker's home directory). '~' is refused: it would not expand once quoted.
check_path() {
  [[ -n $1 ]] || die "$2 must not be empty"
  [[ $1 != *'~'* ]] || die "$2 '$1': write the path without '~' (relative paths are relative to the worker's home directory)"
  [[ $1 =~ ^[A-Za-z0-9_./@+,:=-]+$ ]] || die "$2 '$1' may only hold letters, digits and _ . / @ + , : = -"
}

# remote_path PATH: PATH as a word for the worker's shell; a relative path is
# anchored at "$HOME" so that it does not depend on the current directory.
remote_path() {
  if [[ $1 == /* ]]; then
    quote "$1"
  else
    # shellcheck disable=SC2016  # $HOME must expand on the worker, not here
    printf '"$HOME"/%s' "$(quote "$1")"
  fi
}

# The --zone/--project flags of every gcloud call, in SCOPE (an array).
scope_flags() {
  SCOPE=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then
    SCOPE+=(--project="$PROJECT")
  fi
}

# ssh_extra: --internal-ip for ssh and scp when asked.
ssh_extra() {
  SSH_EXTRA=()
  if ((INTERNAL_IP)); then
    SSH_EXTRA+=(--internal-ip)
  fi
}

# tpu_ssh WORKER COMMAND: runs COMMAND (one string, for the worker's shell) on
# one worker or on all of them at once.
tpu_ssh() {
  scope_flags
  ssh_extra
  run gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker="$1" ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"} --command="$2"
}

# tpu_scp_all SRC DEST [--recurse]: copies a local file or directory to DEST
# on every worker.
tpu_scp_all() {
  scope_flags
  ssh_extra
  run gcloud compute tpus tpu-vm scp ${3+"${@:3}"} "$1" "$NAME:$2" "${SCOPE[@]}" --worker=all ${SSH_EXTRA[@]+"${SSH_EXTRA[@]}"}
}

# Outside --dry-run, gcloud must be installed.
require_gcloud() {
  if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
    fail "gcloud not found on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  fi
}
