#!/usr/bin/env bash
# Installs jaxent with jax[tpu] on every worker of a TPU VM slice.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$SCRIPT_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: setup.sh --name NAME --zone ZONE (--repo-url URL [--ref REF] | --src DIR) [options]

Puts the jaxent source on every worker and installs it into a virtual
environment with `pip install -e '.[tpu]'` (jax[tpu] pulls libtpu from PyPI).
The workers' Ubuntu Python is too old for current JAX, so the environment is
made by uv with a uv-managed Python (--python), unless --system-python names
an interpreter already on the workers.

Source (one of):
  --repo-url URL        git clone URL on every worker (the workers need
                        network access to it)
  --ref REF             branch, tag or commit to check out (with --repo-url)
  --src DIR             a local checkout: packed (without .git, .venv, runs/)
                        and copied to every worker with `tpu-vm scp`

Options:
  --project PROJECT     Google Cloud project (default: gcloud's configured one)
  --workdir PATH        source directory on the workers (default: jaxent;
                        relative paths are relative to the worker's home)
  --venv PATH           virtual environment on the workers (default: jaxent-venv)
  --python VERSION      Python that uv installs (default: 3.12)
  --system-python PATH  use this interpreter on the workers instead of uv
  --extras LIST         pip extras (default: tpu)
  --no-check            skip the final check (all workers start JAX together and
                        print the devices they see)
  --internal-ip         reach the workers by their internal IPs
  --dry-run             print every command instead of running it
  -h, --help            this help

Example:
  tpu_scripts/setup.sh --name jaxent-7b --zone us-east5-a --src . --dry-run
EOF
}

REPO_URL=""
REF=""
SRC=""
WORKDIR=jaxent
VENV=jaxent-venv
PYTHON=3.12
SYSTEM_PYTHON=""
EXTRAS=tpu
CHECK=1

while (($#)); do
  split_equals "$@"
  set -- "${SPLIT[@]}"
  case $1 in
    --name | --zone | --project)
      need_value "$1" "$#" "${2-}"
      common_flag "$1" "$2"
      shift 2
      ;;
    --repo-url) need_value "$1" "$#" "${2-}"; REPO_URL=$2; shift 2 ;;
    --ref) need_value "$1" "$#" "${2-}"; REF=$2; shift 2 ;;
    --src) need_value "$1" "$#" "${2-}"; SRC=$2; shift 2 ;;
    --workdir) need_value "$1" "$#" "${2-}"; WORKDIR=$2; shift 2 ;;
    --venv) need_value "$1" "$#" "${2-}"; VENV=$2; shift 2 ;;
    --python) need_value "$1" "$#" "${2-}"; PYTHON=$2; shift 2 ;;
    --system-python) need_value "$1" "$#" "${2-}"; SYSTEM_PYTHON=$2; shift 2 ;;
    --extras) need_value "$1" "$#" "${2-}"; EXTRAS=$2; shift 2 ;;
    --no-check) CHECK=0; shift ;;
    --internal-ip) INTERNAL_IP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
done

check_target
if [[ -n $REPO_URL && -n $SRC ]]; then
  die "give either --repo-url or --src, not both"
elif [[ -z $REPO_URL && -z $SRC ]]; then
  die "give the source: --repo-url URL (git clone on the workers) or --src DIR (copy a local checkout)"
fi
if [[ -n $REPO_URL ]]; then
  [[ $REPO_URL =~ ^(https://|ssh://|git@|git://|file://)[^[:space:]]+$ ]] ||
    die "--repo-url '$REPO_URL' is not a git URL (https://..., ssh://..., git@host:path)"
  [[ -z $REF || $REF =~ ^[A-Za-z0-9][A-Za-z0-9_./-]*$ ]] || die "--ref '$REF' is not a branch, tag or commit name"
else
  [[ -z $REF ]] || die "--ref goes with --repo-url (--src copies the directory as it is)"
  [[ -d $SRC ]] || die "--src '$SRC' is not a directory"
  [[ -f $SRC/pyproject.toml ]] || die "--src '$SRC' holds no pyproject.toml: give the root of a jaxent checkout"
fi
check_path "$WORKDIR" --workdir
check_path "$VENV" --venv
[[ $PYTHON =~ ^3\.[0-9]+(\.[0-9]+)?$ ]] || die "--python '$PYTHON' must be a version like 3.12"
[[ -z $SYSTEM_PYTHON ]] || check_path "$SYSTEM_PYTHON" --system-python
[[ $EXTRAS =~ ^[a-z0-9_-]+(,[a-z0-9_-]+)*$ ]] || die "--extras '$EXTRAS' must be a comma-separated list like tpu"
require_gcloud

wd=$(remote_path "$WORKDIR")
venv=$(remote_path "$VENV")

# 1. The source on every worker.
if [[ -n $REPO_URL ]]; then
  url=$(quote "$REPO_URL")
  if [[ -n $REF ]]; then
    # fetch REF by name: works for a branch, a tag or (on GitHub/GitLab) a commit.
    fetch="if [ ! -d $wd/.git ]; then git clone --quiet $url $wd; fi"
    fetch+=" && git -C $wd fetch --quiet origin $(quote "$REF") && git -C $wd checkout --quiet --detach FETCH_HEAD"
  else
    fetch="if [ -d $wd/.git ]; then git -C $wd pull --quiet --ff-only; else git clone --quiet $url $wd; fi"
  fi
  tpu_ssh all "set -e; $fetch"
else
  tarball="${TMPDIR:-/tmp}/jaxent-src-$$.tar.gz"
  if ((!DRY_RUN)); then
    trap 'rm -f "$tarball"' EXIT
  fi
  run tar -C "$SRC" -czf "$tarball" --exclude=./.git --exclude=./.venv --exclude=./runs \
    --exclude='*.egg-info' --exclude=__pycache__ .
  tpu_scp_all "$tarball" jaxent-src.tar.gz
  tpu_ssh all "set -e; mkdir -p $wd && tar -xzf \"\$HOME\"/jaxent-src.tar.gz -C $wd && rm \"\$HOME\"/jaxent-src.tar.gz"
fi

# 2. The virtual environment and the editable install.
if [[ -n $SYSTEM_PYTHON ]]; then
  make_venv="$(remote_path "$SYSTEM_PYTHON") -m venv $venv && $venv/bin/python -m pip install --quiet --upgrade pip"
  pip="$venv/bin/python -m pip install --quiet"
else
  # uv's installer puts uv in ~/.local/bin; uv then downloads a Python build.
  make_venv="export PATH=\"\$HOME/.local/bin:\$PATH\"; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh"
  make_venv+=" && uv venv --quiet --allow-existing --python $(quote "$PYTHON") $venv"
  pip="uv pip install --quiet --python $venv/bin/python"
fi
tpu_ssh all "set -e; $make_venv && cd $wd && $pip -e '.[$EXTRAS]' && $venv/bin/jaxent --help >/dev/null && echo \"\$(hostname): jaxent installed in $VENV\""

# 3. All workers start JAX together and see the whole slice (one line each):
# jax.distributed.initialize() finds the other workers from the TPU metadata.
# Bounded: a worker that cannot join makes every worker time out, not hang.
if ((CHECK)); then
  probe="import jax; jax.distributed.initialize(); print(f\"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of {jax.device_count()} {jax.devices()[0].device_kind} devices\")"
  tpu_ssh all "timeout 600 $venv/bin/python -c $(quote "$probe")"
fi
