#!/bin/bash
# Tanuki-8x8B (continued) pretraining from Megatron indexed blends (examples/tanuki_8x8b_pretrain.yaml:
# make the .bin/.idx with `tanuki preprocess-data` first), 2 nodes x 8 H100 by default.
#   sbatch slurm/llm_8x8b_pretrain.sh [key=value ...]
#   DRY_RUN=1 bash slurm/llm_8x8b_pretrain.sh     LOCAL=1 bash slurm/llm_8x8b_pretrain.sh (tiny, CPU, runs/local/pretrain)
# Output, ranks per node and requeue rules: slurm/common.sh.
#SBATCH --job-name=tanuki-8x8b-pretrain
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

CONFIG=examples/tanuki_8x8b_pretrain.yaml
if [[ "${LOCAL:-0}" == 1 ]]; then
  RUN=${RUN:-runs/local/pretrain}
  run "$PYTHON" -m megatron_tanuki.cli demo --data-only --workdir "$RUN"
  run "$PYTHON" -m megatron_tanuki.cli preprocess-data --input "$RUN/data/text.jsonl" --output-prefix "$RUN/data/text" --overwrite
  train pretrain "$CONFIG" model.preset=tanuki-8x8b-tiny model.dtype=fp32 model.init_checkpoint=null \
    model.recompute_granularity=null model.moe_aux_loss_coeff=null "data.blend=[$RUN/data/text]" data.split=90,10,0 \
    data.seq_length=128 parallel.pp=1 parallel.ep=2 train.global_batch_size=4 train.micro_batch_size=2 \
    train.train_steps=${STEPS:-3} train.eval_interval=2 train.eval_iters=1 "checkpoint.dir=$RUN/ckpt" \
    log.tensorboard_dir=null log.interval=1 "$@"
else
  RUN=${RUN:-runs/tanuki_8x8b_pretrain}
  train pretrain "$CONFIG" "checkpoint.dir=$RUN" "$@"
  requeue_unless_finished "$RUN"
fi
