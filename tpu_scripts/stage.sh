#!/usr/bin/env bash
# Copies a model or a data set to the same path on every worker of a slice.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: stage.sh --name NAME --zone ZONE --src SRC --dest PATH [options]

Puts SRC at PATH on every worker: a directory's contents land in PATH, a
single file becomes PATH. Every worker needs its own copy: each process
reads the checkpoint and its shard of the data from local disk.

  --src gs://BUCKET/...  copied by each worker from Cloud Storage (fast inside
                         the region; the workers' service account needs read
                         access): `gcloud storage rsync --recursive` for a
                         folder (resumable), `gcloud storage cp` for an object
  --src LOCAL            a local file or directory, sent to every worker with
                         `tpu-vm scp` (fine for data; slow for a 60 GB model
                         over a home link: upload it to a bucket once instead)
  --dest PATH            where it goes on the workers (absolute, or relative to
                         the worker's home; created with sudo if needed). For a
                         local directory PATH must not exist yet or be empty.

Options:
  --project PROJECT     Google Cloud project (default: gcloud's configured one)
  --internal-ip         reach the workers by their internal IPs
  --dry-run             print every command instead of running it
  -h, --help            this help

Examples (the paths the configs/paper recipes expect):
  tpu_scripts/stage.sh --name jaxent-7b --zone us-east5-a \
      --src gs://my-bucket/models/Qwen2.5-7B --dest /data/models/Qwen2.5-7B
  tpu_scripts/stage.sh --name jaxent-7b --zone us-east5-a \
      --src ./dapo-math-17k.jsonl --dest /data/dapo-math-17k.jsonl
EOF
}

SRC=""
DEST=""

while (($#)); do
  split_equals "$@"
  set -- "${SPLIT[@]}"
  case $1 in
    --name | --zone | --project)
      need_value "$1" "$#" "${2-}"
      common_flag "$1" "$2"
      shift 2
      ;;
    --src) need_value "$1" "$#" "${2-}"; SRC=$2; shift 2 ;;
    --dest) need_value "$1" "$#" "${2-}"; DEST=$2; shift 2 ;;
    --internal-ip) INTERNAL_IP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done

check_target
[[ -n $SRC ]] || die "--src is required (gs://BUCKET/PATH or a local file or directory)"
[[ -n $DEST ]] || die "--dest is required (the path on the workers)"
check_path "$DEST" --dest
DEST=${DEST%/}
[[ -n $DEST && $DEST != . && $DEST != .. ]] || die "--dest must name a file or directory, not the root or home itself"
if [[ $SRC == gs://* ]]; then
  [[ $SRC =~ ^gs://[a-z0-9][-a-z0-9_.]*[a-z0-9](/[A-Za-z0-9_.@+,:=/-]*)?$ ]] ||
    die "--src '$SRC' is not a gs://BUCKET/PATH URL (object names with letters, digits and _ . @ + , : = / - only)"
  SRC=${SRC%/}
elif [[ $SRC == *://* ]]; then
  die "--src '$SRC': only gs:// URLs and local paths are supported"
elif [[ ! -e $SRC ]]; then
  die "--src '$SRC' does not exist"
elif [[ ! -f $SRC && ! -d $SRC ]]; then
  die "--src '$SRC' is neither a file nor a directory"
fi
require_gcloud

dest=$(remote_path "$DEST")
parent_rel=$(dirname "$DEST")
parent=$(remote_path "$parent_rel")
# /data and the like belong to root on a fresh TPU VM.
mk_parent="{ mkdir -p $parent 2>/dev/null && [ -w $parent ]; } || { sudo mkdir -p $parent && sudo chown \"\$(id -u):\$(id -g)\" $parent; }"

if [[ $SRC == gs://* ]]; then
  src=$(quote "$SRC")
  # An object is copied to DEST; anything else is treated as a folder prefix.
  tpu_ssh all "set -e; $mk_parent; if gcloud storage objects describe $src >/dev/null 2>&1; then gcloud storage cp $src $dest; else mkdir -p $dest && gcloud storage rsync --recursive $src $dest; fi; echo \"\$(hostname): $SRC -> $DEST\""
elif [[ -d $SRC ]]; then
  # scp -r of a directory onto a missing path creates it with SRC's contents.
  tpu_ssh all "set -e; $mk_parent; if [ -e $dest ] && ! rmdir $dest 2>/dev/null; then echo \"\$(hostname): $DEST exists and is not empty; remove it or pick another --dest\" >&2; exit 1; fi"
  tpu_scp_all "$SRC" "$DEST" --recurse
else
  tpu_ssh all "$mk_parent"
  tpu_scp_all "$SRC" "$DEST"
fi
