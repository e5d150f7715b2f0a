#!/bin/bash
# Tanuki-vision-8x8B, LLaVA-JP recipe: stage 1 (projector) then stage 2 (projector + LLM), on
# 2 nodes x 8 H100 by default (change with sbatch flags: sbatch --nodes=4 slurm/vlm_8x8b.sh).
#
#   sbatch slurm/vlm_8x8b.sh                       # INIT=... a converted checkpoint (slurm/convert.sh)
#   DRY_RUN=1 bash slurm/vlm_8x8b.sh               # print the launch commands
#   LOCAL=1 bash slurm/vlm_8x8b.sh                 # no Slurm: the tiny config on 2 CPU ranks, in runs/local/
#
# Layout for 16 GPUs. Stage 1 trains only the projector: the 47B language model is frozen (no
# gradients or Adam state), so EP=8 alone fits (11 GB of expert weights + 4 GB dense per GPU) and
# DP=16. Stage 2 trains everything: EP=8 keeps each expert on one GPU with the all-to-all inside a
# node (NVLink); PP=2 halves the per-GPU weights, gradients and Adam state and puts the SigLIP tower
# and projector on the first stage; TP=1 avoids an all-reduce per layer (SP therefore off).
# Requeue friendly: both stages resume from their run folder's `latest`, a finished stage is
# skipped, and SIGUSR1 (sent 5 min before the time limit) makes the ranks checkpoint and leave; the
# job goes back in the queue until stage 2 is finished (the rules in common.sh). A run folder whose
# checkpoints were saved by another model or mode (e.g. a LOCAL=1 tiny run) is refused, never
# skipped or resumed. This script's own log: tanuki-vlm-8x8b-JOBID.out in the submit folder; each
# stage's ranks: logs/tanuki-vlm-8x8b-JOBID-stageN.out.
#SBATCH --job-name=tanuki-vlm-8x8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out

source "$(dirname "${BASH_SOURCE[0]}")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"

if [[ "${LOCAL:-0}" == 1 ]]; then
  # The tiny Tanuki-vision on generated data (the `make demo` configs), a few steps per stage, in
  # its own folder: never the cluster run's, whose stage 1 it would otherwise pass for finished.
  RUN=${RUN:-runs/local/vlm_8x8b}
  DATA=$RUN/data
  run "$PYTHON" -m megatron_tanuki.cli demo --data-only --workdir "$RUN"
  S1=(examples/tiny_vlm_stage1.yaml model.init_checkpoint=null "data.train=[$DATA/stage1.json]"
      "data.image_folder=$DATA/images" train.train_steps=${STEPS:-3})
  S2=(examples/tiny_vlm_stage2.yaml "data.train=[$DATA/stage2.json]" "data.image_folder=$DATA/images"
      train.train_steps=${STEPS:-3} "log.tensorboard_dir=$RUN/tensorboard")
else
  RUN=${RUN:-runs/vlm_8x8b}
  INIT=${INIT:-ckpt/tanuki-vision-8x8b}   # tanuki convert hf-to-mcore output (slurm/convert.sh)
  S1=(examples/tanuki_8x8b_vlm_stage1.yaml "model.init_checkpoint=$INIT" parallel.tp=1 parallel.pp=1 parallel.ep=8)
  S2=(examples/tanuki_8x8b_vlm_stage2.yaml parallel.tp=1 parallel.pp=2 parallel.ep=8 parallel.sp=false)
fi

S1+=("checkpoint.dir=$RUN/stage1" "$@")
if finished "$RUN/stage1" "${S1[@]}"; then echo "stage 1 already finished: $RUN/stage1"; else
  train stage1 "${S1[@]}"
fi
if finished "$RUN/stage1" || [[ "${DRY_RUN:-0}" == 1 ]]; then
  train stage2 "${S2[@]}" "model.init_checkpoint=$RUN/stage1" "checkpoint.dir=$RUN/stage2" "$@"
fi
requeue_unless_finished "$RUN/stage2"
