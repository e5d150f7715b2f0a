#!/bin/bash
# `tanuki serve` (OpenAI-compatible HTTP) as one server over every GPU of the allocation.
#   export TANUKI_API_KEY=...; sbatch slurm/serve.sh CKPT [tanuki serve options ...]
#   sbatch --nodes=2 slurm/serve.sh ckpt/tanuki-8x8b --served-model-name tanuki-8x8b   # TP=8 PP=2
#   DRY_RUN=1 bash slurm/serve.sh CKPT ...   # print the launch
#   LOCAL=1 bash slurm/serve.sh CKPT --nproc 2 ...   # no Slurm: this machine, 127.0.0.1, no key needed
#
# srun starts one rank per GPU on every node; every rank steps the engine, rank 0 (on the first
# node) answers HTTP. Layout: TP = GPUs per node / EP, PP = nodes, EP = 1, unless TP=/PP=/EP= are set
# or --tp/--pp/--ep are given (a flag wins over the variable). Tanuki-8x8B in bf16 is ~94 GB of
# weights: ~12 GB per GPU at TP=8 on one node, the rest of each GPU for the KV cache.
#
# Access. Rank 0 listens on 0.0.0.0:$PORT (default 8000; --host/--port change it) and the log says
# the URL, http://FIRST-NODE:PORT/v1. A non-loopback bind needs a key: TANUKI_API_KEY in the
# environment (sbatch hands the submit environment to the job and srun to the ranks), never on the
# command line, where `scontrol show job`, ps and the log would show it; without it this script
# refuses before anything is launched (the server would refuse too). --host 127.0.0.1 needs no key
# and is reachable only on the first node (ssh -L).
#
# Stopping. The ranks must get SIGTERM themselves: they then stop accepting, finish or cancel
# in-flight requests within --shutdown-grace (default 30 s) and exit 0. srun turns a SIGTERM of its
# own into SIGKILL of the ranks ("srun: forcing job termination"), so nothing here signals srun:
#   - time limit: `--signal=TERM@120` below has Slurm send SIGTERM to the ranks (not to this shell
#     or srun) 2 minutes before the end; keep --shutdown-grace under that;
#   - by hand: `scancel --signal=TERM JOBID` (the ranks only; the job ends when they have drained).
#     A plain `scancel JOBID` also signals srun, which kills the ranks at once;
#   - a SIGTERM to this shell alone (scancel --batch, kill) is passed to the ranks the same way,
#     with `scancel --signal=TERM $SLURM_JOB_ID`.
# Not requeued: a server that stops is done. This script's log: tanuki-serve-JOBID.out in the submit
# folder; the ranks': logs/tanuki-serve-JOBID-serve.out.
#SBATCH --job-name=tanuki-serve
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
source "$(dirname "${BASH_SOURCE[0]}")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"

usage() {
  echo "usage: slurm/serve.sh CKPT [tanuki serve options ...]   (the key in TANUKI_API_KEY; TP= PP= EP= PORT=)" >&2
  exit 2
}
if [[ $# -lt 1 || "$1" == -* ]]; then usage; fi
CKPT=$1; shift
if [[ ! -e "$CKPT" ]]; then
  say "checkpoint $CKPT: no such file or folder (relative paths are from $REPO)"
  exit 2
fi

# The options this script chooses or reads; the rest go to `tanuki serve` as given.
declare -A opt=([tp]=${TP:-} [pp]=${PP:-} [ep]=${EP:-} [host]="" [port]=${PORT:-8000})
insecure=0 rest=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --tp|--pp|--ep|--host|--port)
      [[ $# -ge 2 ]] || { say "$1 needs a value"; usage; }
      opt[${1#--}]=$2; shift 2 ;;
    --tp=*|--pp=*|--ep=*|--host=*|--port=*)
      a=${1#--}; opt[${a%%=*}]=${a#*=}; shift ;;
    --api-key|--api-key=*)
      say "refusing --api-key on the command line: it would show in \`scontrol show job\`, ps and the log;" \
          "export TANUKI_API_KEY=... before sbatch instead"
      exit 2 ;;
    --ckpt|--ckpt=*)
      say "the checkpoint is the first argument (slurm/serve.sh CKPT ...), not --ckpt"; usage ;;
    --insecure-no-api-key) insecure=1; rest+=("$1"); shift ;;
    *) rest+=("$1"); shift ;;
  esac
done
for k in tp pp ep port; do
  if [[ -n "${opt[$k]}" && ! "${opt[$k]}" =~ ^[1-9][0-9]*$ ]]; then
    say "${k^^}=${opt[$k]}: must be a positive integer"; exit 2
  fi
done

loopback() { [[ "$1" == 127.* || "$1" == localhost || "$1" == ::1 || "$1" == "[::1]" ]]; }

check_key() {  # check_key HOST: refuse a non-loopback bind without a key, before anything starts
  if loopback "$1" || [[ -n "${TANUKI_API_KEY:-}" ]]; then return 0; fi
  if [[ "$insecure" == 1 ]]; then
    say "warning: serving on $1 WITHOUT an API key (--insecure-no-api-key): anyone who reaches the port may use it"
    return 0
  fi
  say "refusing to serve on $1 without an API key: export TANUKI_API_KEY=... before sbatch (it reaches" \
      "the ranks through the environment, never the command line or the log), or give --host 127.0.0.1" \
      "(the first node only)"
  exit 2
}

if [[ "${LOCAL:-0}" == 1 ]]; then
  # this machine: the CLI's defaults (127.0.0.1, TP*PP*EP local ranks unless --nproc)
  cmd=("$PYTHON" -m megatron_tanuki.cli serve --ckpt "$CKPT")
  for k in tp pp ep host; do
    if [[ -n "${opt[$k]}" ]]; then cmd+=("--$k" "${opt[$k]}"); fi
  done
  cmd+=(--port "${opt[port]}" "${rest[@]}")
  check_key "${opt[host]:-127.0.0.1}"
  say "tanuki serve: http://${opt[host]:-127.0.0.1}:${opt[port]}/v1 once loaded (GET /health answers 200)"
  # exec: the server itself gets this process's signals (SIGTERM drains it, exit 0)
  if [[ "${DRY_RUN:-0}" == 1 ]]; then run "${cmd[@]}"; exit 0; fi
  exec "${cmd[@]}"
fi

nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
per_node=$(gpus_per_node)
ep=${opt[ep]:-1}
if [[ -z "${opt[tp]}" ]] && (( per_node % ep )); then
  say "EP=$ep does not divide the $per_node GPUs per node: give TP= (or --tp) as well"; exit 2
fi
tp=${opt[tp]:-$(( per_node / ep ))} pp=${opt[pp]:-$nodes}
host=${opt[host]:-0.0.0.0} port=${opt[port]}
check_key "$host"

# rank 0 runs on the first node, where this script runs too (Slurm starts it there)
first=${MASTER_ADDR:-${SLURMD_NODENAME:-$HOSTNAME}}
if loopback "$host"; then
  say "tanuki serve: http://127.0.0.1:$port/v1 on $first only, once loaded (GET /health answers 200)"
else
  [[ "$host" == 0.0.0.0 || "$host" == "::" ]] || first=$host
  say "tanuki serve: http://$first:$port/v1 once loaded (GET /health answers 200;" \
      "Authorization: Bearer \$TANUKI_API_KEY)"
fi
say "layout TP=$tp PP=$pp EP=$ep on $nodes node(s) x $per_node GPU(s); the ranks log to $LOG_DIR/%x-%j-serve.out"

cmd=(srun --nodes="$nodes" --ntasks-per-node="$per_node" --gpus-per-node="$per_node"
  --cpus-per-task="${CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-12}}" --kill-on-bad-exit=1
  --output="$LOG_DIR/%x-%j-serve.out"
  "$PYTHON" -m megatron_tanuki.cli serve --ckpt "$CKPT" --tp "$tp" --pp "$pp")
if [[ "$ep" != 1 ]]; then cmd+=(--ep "$ep"); fi
cmd+=(--host "$host" --port "$port" "${rest[@]}")
if [[ "${DRY_RUN:-0}" == 1 ]]; then run "${cmd[@]}"; exit 0; fi

# common.sh's traps are the training requeue rules: a server has none. SIGTERM to this shell goes to
# the ranks through Slurm (never to srun, see above); srun's exit status is the job's.
_TERM_SENT=0
_serve_term() {
  _TRAPPED=1
  [[ "$_TERM_SENT" == 1 ]] && return 0
  _TERM_SENT=1
  say "SIGTERM: passing it to the ranks (scancel --signal=TERM ${SLURM_JOB_ID:-?}); they drain and exit"
  scancel --signal=TERM "${SLURM_JOB_ID:?SLURM_JOB_ID is not set}" || say "scancel --signal=TERM failed"
}
trap - USR1 ALRM
trap _serve_term TERM
status=0
_launch "${cmd[@]}" || status=$?
say "tanuki serve exited with status $status"
exit "$status"
