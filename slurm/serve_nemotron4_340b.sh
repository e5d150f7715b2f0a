#!/bin/bash
# Nemotron-4-340B (Instruct) behind `tanuki serve`: slurm/serve.sh with this model's layout and chat template.
#   export TANUKI_API_KEY=...; sbatch slurm/serve_nemotron4_340b.sh CKPT [tanuki serve options ...]
#   MODE=h200 sbatch --nodes=1 slurm/serve_nemotron4_340b.sh CKPT        # one node of 8 H200
#   DRY_RUN=1 [MODE=...] bash slurm/serve_nemotron4_340b.sh CKPT ...     # print the launch
#   LOCAL=1 bash slurm/serve_nemotron4_340b.sh TINY_CKPT --tokenizer T   # no Slurm: this machine's CPU
# CKPT: `tanuki convert nemo-to-mcore --nemo ./Nemotron-4-340B-Instruct --out CKPT` (bf16).
#
# MODE (the environment; sbatch hands it to the job):
#   h100x2 (default)  2 nodes x 8 H100, TP=8 PP=2, bf16: 42.6 GB of weights per GPU, ~33 GB left for the
#                     KV cache (about 220 concurrent 4096-token sequences)
#   h200              1 node x 8 H200, TP=8 PP=1, bf16: 85.3 GB of weights per GPU, ~52 GB of KV (about 171)
#   h100-fp8          1 node x 8 H100, TP=8, Transformer Engine FP8 weights and GEMMs (--fp8 e4m3; 43.8 GB per
#                     GPU, about 106 sequences); needs TE in the environment (pip install megatron_tanuki[te]);
#                     not for LOCAL=1 (no FP8 on a CPU)
# The numbers: `tanuki model-info nemotron4-340b --plan tp=8,pp=2` (--gpu h200, --dtype fp8).
# The allocation must be the mode's (this header asks for h100x2's 2 nodes; give --nodes=1 to sbatch for
# the one-node modes): a mismatch is refused before anything starts. The layout is the mode's: --tp/--pp/
# --ep/--nproc are refused (slurm/serve.sh takes any layout). LOCAL=1 runs the same `tanuki serve`
# command on 2 CPU ranks, the mode's split shrunk: PP=2 for h100x2, TP=2 for h200.
# Everything else -- the API key (TANUKI_API_KEY, never on the command line), PORT, --host, stopping with
# `scancel --signal=TERM JOBID`, the logs -- is slurm/serve.sh's; read its header.
#SBATCH --job-name=nemotron4-340b-serve
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail

say() { echo "[slurm] $*" >&2; }

# sbatch runs a spooled copy of this script: serve.sh is found beside it or in the submit folder's checkout
SERVE=$(dirname "${BASH_SOURCE[0]}")/serve.sh
[[ -f "$SERVE" ]] || SERVE=${SLURM_SUBMIT_DIR:-.}/slurm/serve.sh

usage() {
  echo "usage: [MODE=h100x2|h200|h100-fp8] slurm/serve_nemotron4_340b.sh CKPT [tanuki serve options ...]" >&2
  exit 2
}

MODE=${MODE:-h100x2}
case $MODE in
  h100x2) nodes=2 tp=8 pp=2 local_split=(--tp 1 --pp 2) precision=(--dtype bf16) ;;
  h200) nodes=1 tp=8 pp=1 local_split=(--tp 2 --pp 1) precision=(--dtype bf16) ;;
  h100-fp8) nodes=1 tp=8 pp=1 local_split=() precision=(--fp8 e4m3) ;;
  *) say "MODE=$MODE: expected h100x2 (default), h200 or h100-fp8"; usage ;;
esac
if [[ $# -lt 1 || "$1" == -* ]]; then usage; fi
for a in "${@:2}"; do
  case $a in
    --tp|--tp=*|--pp|--pp=*|--ep|--ep=*|--nproc|--nproc=*)
      say "MODE=$MODE fixes the layout (TP=$tp PP=$pp); ${a%%=*} is not taken here: use slurm/serve.sh for another layout"
      exit 2 ;;
  esac
done
CKPT=$1; shift

if [[ "${LOCAL:-0}" == 1 ]]; then
  if [[ ${#local_split[@]} -eq 0 ]]; then
    say "MODE=$MODE needs Transformer Engine FP8 on GPUs: LOCAL=1 cannot run it (try MODE=h100x2 or h200)"
    exit 2
  fi
  say "MODE=$MODE on this machine: ${local_split[*]} (2 CPU ranks)"
  exec env LOCAL=1 bash "$SERVE" "$CKPT" "${local_split[@]}" --chat nemotron4 "$@"
fi

have=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}
per_node=${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-}}
if [[ -z "$have" ]]; then
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    say "no Slurm allocation: submit it (MODE=$MODE sbatch --nodes=$nodes slurm/serve_nemotron4_340b.sh CKPT)," \
        "or print the launch with DRY_RUN=1, or run it here on CPU with LOCAL=1"
    exit 2
  fi
  say "no Slurm allocation: printing the launch as \`sbatch --nodes=$nodes\` would run it"
  export SLURM_JOB_NUM_NODES=$nodes SLURM_GPUS_ON_NODE=8
elif [[ "$have" != "$nodes" || ( -n "$per_node" && "$per_node" != 8 ) ]]; then
  say "MODE=$MODE runs on $nodes node(s) x 8 GPUs; this job has $have node(s) x ${per_node:-?} GPU(s):" \
      "submit it as MODE=$MODE sbatch --nodes=$nodes --gpus-per-node=8 slurm/serve_nemotron4_340b.sh CKPT"
  exit 2
fi
exec bash "$SERVE" "$CKPT" --tp "$tp" --pp "$pp" --chat nemotron4 "${precision[@]}" "$@"
