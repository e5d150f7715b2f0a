#!/bin/bash
# HF <-> Megatron conversion on one CPU node (streaming: a few GB of memory for any model size).
#   sbatch slurm/convert.sh hf-to-mcore --hf ./Tanuki-8x8B-vision-exp --vision ./siglip-so400m-patch14-384 --out ckpt/tanuki-vision-8x8b
#   sbatch slurm/convert.sh mcore-to-hf --ckpt runs/vlm_8x8b/stage2 --out hf/tanuki-vision-8x8b
#   DRY_RUN=1 bash slurm/convert.sh ...     LOCAL=1 bash slurm/convert.sh ...   (no Slurm)
#SBATCH --job-name=tanuki-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"

if [[ $# -lt 1 ]]; then
  echo "usage: slurm/convert.sh hf-to-mcore|mcore-to-hf|verify ARGS..." >&2
  exit 2
fi
run "$PYTHON" -m megatron_tanuki.cli convert "$@"
