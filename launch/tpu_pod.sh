#!/usr/bin/env bash
# Run lasa_jax on every worker of a Cloud TPU VM (a single host or a pod slice).
#
#   launch/tpu_pod.sh --name lasa-v4 --zone us-central2-b --accelerator-type v4-32 \
#       --config configs/qwen2_5_32b.py -- --config.workdir=gs://bucket/runs/qwen32b
#
# Steps: create the TPU VM unless it exists; pack this checkout (tracked and untracked,
# non-ignored files) into a tarball and copy it to every worker; `pip install -e '.[tpu]'`
# there; run the same `python -m lasa_jax.main` on every worker at once, streaming all workers'
# output here and into a local log file. Arguments after `--` go to lasa_jax.main.
#
# Options (or the environment variable in brackets):
#   --name NAME               TPU VM name [TPU_NAME] (required)
#   --zone ZONE               [ZONE] (required)
#   --accelerator-type TYPE   e.g. v4-8, v4-32, v5p-64 [ACCELERATOR_TYPE]; needed only to create
#   --version VERSION         TPU runtime, e.g. tpu-ubuntu2204-base [RUNTIME_VERSION]
#   --project PROJECT         [PROJECT] (default: gcloud's configured project)
#   --config FILE             run config [CONFIG] (default configs/llama8b.py)
#   --spot                    create a Spot TPU VM [SPOT=1]
#   --skip-install            reuse the code and packages already on the workers [SKIP_INSTALL=1]
#   --log FILE                local log file [LOG_FILE] (default logs/<name>-<time>.log)
set -euo pipefail

GCLOUD="${GCLOUD:-gcloud}"
TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
PROJECT="${PROJECT:-}"
CONFIG="${CONFIG:-configs/llama8b.py}"
SPOT="${SPOT:-0}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
LOG_FILE="${LOG_FILE:-}"
REMOTE_DIR=lasa_jax   # relative to the worker's home, where ssh commands start
REMOTE_TARBALL=/tmp/lasa_jax_src.tar.gz

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) TPU_NAME="${2:?--name needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator-type) ACCELERATOR_TYPE="${2:?--accelerator-type needs a value}"; shift 2 ;;
    --version) RUNTIME_VERSION="${2:?--version needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --log) LOG_FILE="${2:?--log needs a value}"; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) die "unknown option '$1' (lasa_jax.main flags go after --)" ;;
  esac
done

[[ -n "$TPU_NAME" ]] || die "no TPU name: pass --name or set TPU_NAME"
[[ -n "$ZONE" ]] || die "no zone: pass --zone or set ZONE"
if [[ -z "$PROJECT" ]]; then
  PROJECT="$("$GCLOUD" config get-value project 2>/dev/null || true)"
  [[ -n "$PROJECT" ]] || die "no project: pass --project, set PROJECT, or run 'gcloud config set project ...'"
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -f "$REPO_ROOT/$CONFIG" ]] || die "config file '$CONFIG' not found under $REPO_ROOT"
LOG_FILE="${LOG_FILE:-$REPO_ROOT/logs/${TPU_NAME}-$(date +%Y%m%d-%H%M%S).log}"
mkdir -p "$(dirname "$LOG_FILE")"

tpu() { "$GCLOUD" compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"; }

if tpu describe "$TPU_NAME" --format='value(state)' >/dev/null 2>&1; then
  echo "Reusing TPU VM $TPU_NAME in $ZONE"
else
  [[ -n "$ACCELERATOR_TYPE" ]] || die "TPU VM '$TPU_NAME' does not exist; pass --accelerator-type to create it"
  echo "Creating TPU VM $TPU_NAME ($ACCELERATOR_TYPE, $RUNTIME_VERSION) in $ZONE"
  create_flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ "$SPOT" == 1 ]] && create_flags+=(--spot)
  tpu create "$TPU_NAME" "${create_flags[@]}"
fi

# A GCE TPU pod shows its worker list only through the metadata server, not in the environment,
# so tell lasa_jax the process count; JAX then reads coordinator and process id from metadata.
endpoints="$(tpu describe "$TPU_NAME" --format='value(networkEndpoints[].ipAddress)')"
IFS=';, ' read -r -a endpoint_list <<<"$endpoints" || true
NUM_WORKERS="${#endpoint_list[@]}"
[[ "$NUM_WORKERS" -ge 1 ]] || die "could not read the worker list of '$TPU_NAME' (networkEndpoints is empty)"
echo "$TPU_NAME has $NUM_WORKERS worker(s)"

if [[ "$SKIP_INSTALL" != 1 ]]; then
  tmpdir="$(mktemp -d)"
  trap 'rm -rf "$tmpdir"' EXIT
  tarball="$tmpdir/lasa_jax_src.tar.gz"
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Respect .gitignore so local workdirs, venvs and checkpoints are not shipped.
    git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard \
      | tar -C "$REPO_ROOT" --null -T - -czf "$tarball"
  else
    tar -C "$REPO_ROOT" --exclude=.git --exclude='*.pyc' -czf "$tarball" .
  fi
  echo "Copying $(du -h "$tarball" | cut -f1) of source to all workers"
  tpu scp "$tarball" "$TPU_NAME:$REMOTE_TARBALL" --worker=all
  tpu ssh "$TPU_NAME" --worker=all --command="set -e; rm -rf $REMOTE_DIR; mkdir -p $REMOTE_DIR; \
tar -xzf $REMOTE_TARBALL -C $REMOTE_DIR; cd $REMOTE_DIR; python3 -m pip install -q -e '.[tpu]'"
fi

main_args=(--config="$CONFIG" --config.distributed.initialize=auto)
[[ "$NUM_WORKERS" -gt 1 ]] && main_args+=(--config.distributed.num_processes="$NUM_WORKERS")
main_args+=("$@")
quoted="$(printf '%q ' "${main_args[@]}")"
remote_cmd="cd $REMOTE_DIR && PYTHONUNBUFFERED=1 python3 -m lasa_jax.main $quoted"

echo "Running on all $NUM_WORKERS worker(s); log: $LOG_FILE"
echo "+ $remote_cmd" | tee -a "$LOG_FILE"
tpu ssh "$TPU_NAME" --worker=all --command="$remote_cmd" 2>&1 | tee -a "$LOG_FILE"
