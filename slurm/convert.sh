#!/bin/bash
# HF <-> Megatron conversion and `verify` on one CPU node (no GPUs: nothing here reads GPU counts).
#   sbatch slurm/convert.sh hf-to-mcore --hf ./Tanuki-8x8B-vision-exp --vision ./siglip-so400m-patch14-384 --out ckpt/tanuki-vision-8x8b
#   sbatch slurm/convert.sh mcore-to-hf --ckpt runs/vlm_8x8b/stage2 --out hf/tanuki-vision-8x8b
#   sbatch slurm/convert.sh verify --hf ./Tanuki-8x8B --ckpt ckpt/tanuki-8x8b --dtype bf16
#   DRY_RUN=1 bash slurm/convert.sh ...     LOCAL=1 bash slurm/convert.sh ...   (no Slurm)
#
# Memory. Conversion streams one tensor at a time: a few GB for any model size. `verify` holds the
# whole transformers model, then the whole megatron model over its ranks: for Tanuki-8x8B about
# 210 GB in fp32, 106 GB with --dtype bf16 (`tanuki convert verify` prints its estimate). So this
# script hands verify the job's memory (--mem, else what the machine has free) as
# --memory-budget-gb, and verify compares the first N layers that fit (8 of 32 in bf16 with the
# 32 GB below), saying so. To compare every layer, ask for the memory: `sbatch --mem=120G
# slurm/convert.sh verify ... --dtype bf16`. An explicit --layers or --memory-budget-gb is kept.
#
# Output: %x-%j.out (tanuki-convert-JOBID.out) in the submit folder: Slurm does not create
# folders named in --output, and a job whose folder is missing dies without a word.
#SBATCH --job-name=tanuki-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"

if [[ $# -lt 1 ]]; then
  echo "usage: slurm/convert.sh hf-to-mcore|mcore-to-hf|verify ARGS..." >&2
  exit 2
fi

memory_gb() {  # the memory this job may use, in GB: Slurm's --mem (or --mem-per-cpu), else free memory here
  if [[ "${LOCAL:-0}" != 1 && "${SLURM_MEM_PER_NODE:-}" =~ ^[0-9]+$ ]]; then
    echo $(( SLURM_MEM_PER_NODE / 1024 ))
  elif [[ "${LOCAL:-0}" != 1 && "${SLURM_MEM_PER_CPU:-}" =~ ^[0-9]+$ && "${SLURM_CPUS_ON_NODE:-}" =~ ^[0-9]+$ ]]; then
    echo $(( SLURM_MEM_PER_CPU * SLURM_CPUS_ON_NODE / 1024 ))
  else
    awk '/^MemAvailable:/ { print int($2 / 1048576) }' /proc/meminfo
  fi
}

args=("$@")
if [[ "$1" == verify ]]; then
  sized=0
  for a in "$@"; do [[ "$a" == --layers* || "$a" == --memory-budget-gb* ]] && sized=1; done
  if [[ "$sized" == 0 ]]; then
    budget=$(memory_gb)
    say "verify: memory budget ${budget} GB (the job's memory); verify compares the layers that fit"
    args+=(--memory-budget-gb "$budget")
  fi
fi
run "$PYTHON" -m megatron_tanuki.cli convert "${args[@]}"
