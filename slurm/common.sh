# Shared by the slurm/*.sh scripts (sourced, not run). One launch function for three modes:
#   default      srun, one task per GPU; ranks, world size and rendezvous come from SLURM_* (no ssh
#                loops: megatron_tanuki reads SLURM_PROCID/NTASKS/LOCALID, and MASTER_ADDR exported
#                here from `scontrol show hostnames`, else the first host of the node list)
#   DRY_RUN=1    print the commands instead of running them
#   LOCAL=1      no Slurm: `tanuki train --nproc $LOCAL_NPROC` on this machine (CPU ranks over gloo)
#
# Output: a script's own log is `#SBATCH --output=%x-%j.out` in the submit folder. Slurm does not
# create folders, and a job whose --output folder is missing dies before its first line without a
# word, so no script names a folder there; the training steps write $LOG_DIR/%x-%j-STEP.out
# (default logs/), created below at run time.
#
# Ranks per node come from the allocation, in this order: SLURM_GPUS_ON_NODE (the GPUs Slurm gave
# this node: --gpus-per-node / --gres), SLURM_NTASKS_PER_NODE (--ntasks-per-node); only when neither
# is set, GPUS_PER_NODE (default 8), with a message.
#
# Requeue. The scripts ask for `--signal=B:USR1@300`: this shell gets SIGUSR1 five minutes before
# the time limit and forwards it to srun, which passes it to every rank (they finish the step,
# checkpoint and exit). The job goes back in the queue when the run is not finished and
#   - the stop came after SIGUSR1 (time limit), whatever srun's exit status: when the ranks are
#     still running REQUEUE_GRACE s (default 240) after it, the checkpoint overran the window and
#     the job is requeued at once (resuming from the previous `latest`) before Slurm's SIGTERM;
#   - or srun exited 0 (a stop on a signal Slurm sent the ranks, or train.exit_after_steps);
#   - or srun failed but this job made progress (`latest` moved: the crash cost at most the steps
#     since the last checkpoint, and a crash loop stops at the first requeue that saves nothing).
# A failure without progress or SIGUSR1 (a config error, a crash before any checkpoint) ends the
# chain with srun's exit status instead of requeueing forever. A SIGTERM without SIGUSR1 (scancel,
# preemption: Slurm requeues preempted --requeue jobs itself) never requeues.
set -euo pipefail

# sbatch runs a copy of the script from its spool folder: find the checkout from the submit dir.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$REPO"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
LOCAL_NPROC=${LOCAL_NPROC:-2}
LOG_DIR=${LOG_DIR:-$REPO/logs}
REQUEUE_GRACE=${REQUEUE_GRACE:-240}
mkdir -p "$LOG_DIR"

export CUDA_DEVICE_MAX_CONNECTIONS=1   # TP/SP comm kernels must be scheduled before compute kernels
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export PYTHONUNBUFFERED=1
if [[ "${LOCAL:-0}" != 1 && -z "${MASTER_ADDR:-}" && -n "${SLURM_JOB_NODELIST:-}" ]] \
    && command -v scontrol >/dev/null 2>&1; then
  # scontrol expands every hostlist form; without it the ranks parse SLURM_*NODELIST themselves
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) || true
  [[ -n "$MASTER_ADDR" ]] && export MASTER_ADDR || unset MASTER_ADDR
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "export CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS OMP_NUM_THREADS=$OMP_NUM_THREADS${MASTER_ADDR:+ MASTER_ADDR=$MASTER_ADDR}"
fi

run() {  # run CMD... (or print it under DRY_RUN=1)
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

say() { echo "[slurm] $*" >&2; }

gpus_per_node() {  # ranks per node, from the allocation (order above)
  local v
  for v in SLURM_GPUS_ON_NODE SLURM_NTASKS_PER_NODE; do
    if [[ "${!v:-}" =~ ^[1-9][0-9]*$ ]]; then echo "${!v}"; return; fi
  done
  say "neither SLURM_GPUS_ON_NODE nor SLURM_NTASKS_PER_NODE is set: ${GPUS_PER_NODE:-8} ranks per node" \
      "(GPUS_PER_NODE${GPUS_PER_NODE:+=$GPUS_PER_NODE}, default 8)"
  echo "${GPUS_PER_NODE:-8}"
}

# --- run folders ------------------------------------------------------------------------------
declare -A _CHECKED=()

ckpt_dir() {  # ckpt_dir [key=value ...]: the last checkpoint.dir= among the overrides (as `train` reads them)
  local a d=""
  for a in "$@"; do [[ "$a" == checkpoint.dir=* ]] && d=${a#checkpoint.dir=}; done
  echo "$d"
}

check_run() {  # check_run RUN_DIR CONFIG [key=value ...]: exit 1 when RUN_DIR holds another model's or mode's checkpoints
  local dir=$1; shift
  [[ -f "$dir/latest" && -z "${_CHECKED[$dir]:-}" ]] || return 0
  if ! "$PYTHON" -m megatron_tanuki.train.checkpoint check-config "$dir" "$@"; then
    say "refusing to skip or resume $dir: set RUN=... to another folder, or remove it"
    exit 1
  fi
  _CHECKED[$dir]=1
}

finished() {  # finished RUN_DIR [CONFIG [key=value ...]]: true when `tanuki train` completed all its steps there
  if [[ $# -gt 1 ]]; then check_run "$@"; fi  # ... for this model and mode (exits otherwise)
  [[ -f "$1/finished" ]]
}

_latest() { cat "$1/latest" 2>/dev/null || true; }

# --- signals and requeue (Slurm mode) ---------------------------------------------------------
# srun runs in the background and this shell in `wait`, which a trapped signal interrupts at once
# (a foreground child would delay the trap until it returns); `wait` is then asked again, and bash
# keeps the exit status of a child that ended meanwhile. The watch over the ranks after SIGUSR1 is
# a timer process sending SIGALRM, so that only `wait` ever reaps srun.
_CHILD="" _TIMER="" _USR1=0 _REQUEUED=0 _TRAPPED=0

requeue() {  # requeue REASON: put this job back in the queue (once)
  [[ "$_REQUEUED" == 1 ]] && return 0
  _REQUEUED=1
  say "requeueing job ${SLURM_JOB_ID:-?}: $*"
  scontrol requeue "${SLURM_JOB_ID:?SLURM_JOB_ID is not set}" || say "scontrol requeue failed"
}

_alarm_in() {  # _alarm_in SECONDS: SIGALRM to this shell then, unless the timer ($_TIMER) is killed first
  local parent=$$
  ( trap 'kill "$t" 2>/dev/null; exit 0' TERM; sleep "$1" & t=$!; wait "$t" && kill -ALRM "$parent" ) &
  _TIMER=$!
}

_on_usr1() {
  _TRAPPED=1 _USR1=1
  say "SIGUSR1 (time limit near): the ranks checkpoint and leave"
  if [[ -n "$_CHILD" ]]; then
    kill -USR1 "$_CHILD" 2>/dev/null || true
    [[ -n "$_TIMER" ]] || _alarm_in "$REQUEUE_GRACE"
  fi
}

_on_alrm() {
  _TRAPPED=1 _TIMER=""
  [[ -n "$_CHILD" ]] || return 0
  requeue "the ranks were still running ${REQUEUE_GRACE} s after SIGUSR1 (checkpoint overran the window)"
  kill -TERM "$_CHILD" 2>/dev/null || true
}

_on_term() {
  if [[ "$_USR1" == 1 ]]; then
    requeue "SIGTERM after SIGUSR1 (time limit)"
  else
    say "SIGTERM without SIGUSR1 (scancel or preemption): not requeued by this script"
  fi
  [[ -n "$_CHILD" ]] && kill -TERM "$_CHILD" 2>/dev/null
  [[ -n "$_TIMER" ]] && kill "$_TIMER" 2>/dev/null
  exit 143
}

if [[ "${DRY_RUN:-0}" != 1 && "${LOCAL:-0}" != 1 ]]; then
  trap _on_usr1 USR1
  trap _on_alrm ALRM
  trap _on_term TERM
fi

_launch() {  # _launch CMD...: run it in the background and wait for it through any trapped signal
  local s
  "$@" &
  _CHILD=$!
  while :; do
    _TRAPPED=0
    if wait "$_CHILD"; then s=0; else s=$?; fi
    [[ "$_TRAPPED" == 1 ]] || break
  done
  _CHILD=""
  if [[ -n "$_TIMER" ]]; then kill "$_TIMER" 2>/dev/null || true; _TIMER=""; fi
  return "$s"
}

# --- the launch -------------------------------------------------------------------------------
train() {  # train NAME CONFIG [key=value ...]  (the run folder: the last checkpoint.dir=)
  local name=$1 config=$2; shift 2
  local dir; dir=$(ckpt_dir "$@")
  [[ -n "$dir" ]] && check_run "$dir" "$config" "$@"
  if [[ "${LOCAL:-0}" == 1 ]]; then
    run "$PYTHON" -m megatron_tanuki.cli train "$config" --nproc "$LOCAL_NPROC" "$@"
    return
  fi
  if [[ "$_USR1" == 1 ]]; then say "time limit near: not starting $name"; return 0; fi
  local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} per_node; per_node=$(gpus_per_node)
  local cmd=(srun --nodes="$nodes" --ntasks-per-node="$per_node" --gpus-per-node="$per_node"
    --cpus-per-task="${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-12}}" --kill-on-bad-exit=1
    --output="$LOG_DIR/%x-%j-$name.out"
    "$PYTHON" -m megatron_tanuki.train "$config" "$@")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then run "${cmd[@]}"; return; fi
  local before status=0; before=$(_latest "$dir")
  _launch "${cmd[@]}" || status=$?
  if [[ "$status" != 0 ]]; then
    if [[ -n "$dir" && -f "$dir/finished" ]]; then  # e.g. a NCCL teardown error after the last save
      say "$name exited with $status after finishing its run in $dir: carrying on"
      return 0
    elif [[ "$_USR1" == 1 ]]; then
      requeue "$name stopped after SIGUSR1 (exit $status)"
    elif [[ -n "$dir" && "$(_latest "$dir")" != "$before" ]]; then
      requeue "$name failed (exit $status) after saving $(_latest "$dir") in this job"
    else
      say "$name failed (exit $status) without a new checkpoint or SIGUSR1: not requeued (see $LOG_DIR)"
    fi
    exit "$status"
  fi
}

requeue_unless_finished() {  # requeue_unless_finished RUN_DIR: after a stop with a checkpoint, go back in the queue
  if [[ "${DRY_RUN:-0}" != 1 && "${LOCAL:-0}" != 1 ]] && ! finished "$1"; then
    requeue "$1 is not finished"
  fi
}
