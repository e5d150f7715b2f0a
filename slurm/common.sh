# Shared by the slurm/*.sh scripts (sourced, not run). One launch function for three modes:
#   default      srun, one task per GPU; ranks, world size and rendezvous come from SLURM_* (no ssh
#                loops, no node names: megatron_tanuki reads SLURM_PROCID/NTASKS/LOCALID and the
#                first host of SLURM_JOB_NODELIST)
#   DRY_RUN=1    print the commands instead of running them
#   LOCAL=1      no Slurm: `tanuki train --nproc $LOCAL_NPROC` on this machine (CPU ranks over gloo)
set -euo pipefail

# sbatch runs a copy of the script from its spool folder: find the checkout from the submit dir.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
cd "$REPO"
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
LOCAL_NPROC=${LOCAL_NPROC:-2}
LOG_DIR=${LOG_DIR:-$REPO/logs}
mkdir -p "$LOG_DIR"

export CUDA_DEVICE_MAX_CONNECTIONS=1   # TP/SP comm kernels must be scheduled before compute kernels
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export PYTHONUNBUFFERED=1
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "export CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS OMP_NUM_THREADS=$OMP_NUM_THREADS"
fi

run() {  # run CMD... (or print it under DRY_RUN=1)
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

train() {  # train NAME CONFIG [key=value ...]
  local name=$1 config=$2; shift 2
  if [[ "${LOCAL:-0}" == 1 ]]; then
    run "$PYTHON" -m megatron_tanuki.cli train "$config" --nproc "$LOCAL_NPROC" "$@"
  else
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}} per_node=${GPUS_PER_NODE:-8}
    run srun --nodes="$nodes" --ntasks-per-node="$per_node" --gpus-per-node="$per_node" \
      --cpus-per-task="${CPUS_PER_TASK:-12}" --kill-on-bad-exit=1 \
      --output="$LOG_DIR/%x-%j-$name.out" \
      "$PYTHON" -m megatron_tanuki.train "$config" "$@"
  fi
}

finished() {  # finished RUN_DIR: true when `tanuki train` completed all its steps there
  [[ -f "$1/finished" ]]
}

requeue_unless_finished() {  # after a time-limit stop (SIGUSR1 -> checkpoint), go back in the queue
  if [[ "${DRY_RUN:-0}" != 1 && "${LOCAL:-0}" != 1 ]] && ! finished "$1"; then
    scontrol requeue "$SLURM_JOB_ID"
  fi
}
