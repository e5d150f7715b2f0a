#!/bin/bash
# SFT of Tanuki-8B or Tanuki-8x8B from a YAML (default examples/tanuki_8x8b_sft.yaml).
#   sbatch slurm/sft.sh [CONFIG.yaml] [key=value ...]
#   DRY_RUN=1 bash slurm/sft.sh ...      LOCAL=1 bash slurm/sft.sh   (tiny chat SFT on 2 CPU ranks, runs/local/sft)
# Output, ranks per node and requeue rules: slurm/common.sh.
#SBATCH --job-name=tanuki-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"

CONFIG=${1:-examples/tanuki_8x8b_sft.yaml}
[[ $# -gt 0 ]] && shift
if [[ "${LOCAL:-0}" == 1 ]]; then
  RUN=${RUN:-runs/local/sft}
  run "$PYTHON" -m megatron_tanuki.cli demo --data-only --workdir "$RUN"
  # The demo's Q&A as chat records; the tiny MoE, a few steps.
  run "$PYTHON" - "$RUN/data/stage2.json" "$RUN/chat.jsonl" <<'PY'
import json, sys
recs = json.load(open(sys.argv[1], encoding="utf-8"))
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for r in recs[:500]:
        q, a = (c["value"].replace("<image>\n", "") for c in r["conversations"])
        f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                           ensure_ascii=False) + "\n")
PY
  train sft "$CONFIG" model.preset=tanuki-8x8b-tiny model.dtype=fp32 model.init_checkpoint=null \
    "data.train=[$RUN/chat.jsonl]" data.seq_length=128 parallel.tp=1 parallel.pp=1 parallel.ep=2 \
    model.recompute_granularity=null train.global_batch_size=4 train.micro_batch_size=2 train.train_steps=${STEPS:-3} \
    "checkpoint.dir=$RUN/ckpt" log.tensorboard_dir=null log.interval=1 "$@"
else
  RUN=${RUN:-runs/$(basename "$CONFIG" .yaml)}
  train sft "$CONFIG" "checkpoint.dir=$RUN" "$@"
  requeue_unless_finished "$RUN"
fi
