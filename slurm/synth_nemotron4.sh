#!/bin/bash
# Synthetic conversations with Nemotron-4-340B-Instruct as the teacher, in one job: the teacher behind
# `tanuki serve` (slurm/serve_nemotron4_340b.sh: its MODEs, layouts and checks) and `tanuki synth run`
# against it.
#   export TANUKI_API_KEY=...
#   sbatch slurm/synth_nemotron4.sh CKPT RECIPE OUT [tanuki synth run options ...] [-- tanuki serve options ...]
#   sbatch slurm/synth_nemotron4.sh ckpt/nemotron4-340b-instruct examples/synth_persona_math_nemotron4.yaml out/pm
#   MODE=h200 sbatch --nodes=1 slurm/synth_nemotron4.sh CKPT RECIPE OUT    # one node of 8 H200
#   sbatch --array=0-15 slurm/synth_nemotron4.sh CKPT RECIPE OUT           # 16 teachers, one slice each
#   DRY_RUN=1 [MODE=...] bash slurm/synth_nemotron4.sh CKPT RECIPE OUT ...  # print the commands
#   LOCAL=1 bash slurm/synth_nemotron4.sh TINY_CKPT RECIPE OUT --limit 6 -- --chat tanuki   # this machine's CPU
# CKPT: `tanuki convert nemo-to-mcore` of Nemotron-4-340B-Instruct; MODE (h100x2 default, h200, h100-fp8) and
# the allocation it needs are slurm/serve_nemotron4_340b.sh's -- read its header. Relative paths are from the
# folder the script is started in (sbatch: the submit folder).
#
# What the job does:
#   1. checks the client's command before the teacher loads (a 340B load for nothing otherwise):
#      the options, the recipe, that OUT holds this recipe's output or nothing, that the recipe's
#      teacher.chat (if set) is the template the server renders with (nemotron4, or the serve options'
#      --chat), and the server's launch (serve_nemotron4_340b.sh's own checks, as a dry run);
#   2. starts the server in the background: srun over every GPU, rank 0 on the first node (where this
#      script runs), 0.0.0.0:$PORT (default 8000; the serve options' --host/--port change it). A
#      non-loopback bind needs TANUKI_API_KEY in the environment (never on a command line); the client
#      gets it through --api-key-env TANUKI_API_KEY. `-- --host 127.0.0.1` needs no key (the client runs
#      on the first node). The ranks log to $LOG_DIR/%x-%j-serve.out;
#   3. waits until GET http://FIRST-NODE:PORT/v1/models answers 200: at most SERVE_WAIT s (default 3600),
#      asked every SERVE_POLL s (default 5, LOCAL=1: 1); a server that exits meanwhile ends the job (exit 1);
#   4. runs `tanuki synth run RECIPE --out OUT --backend openai --base-url http://FIRST-NODE:PORT/v1
#      [--shard i/n]` in this shell. In an array job (--array=0-15) the slice is i = task id - first id,
#      n = the number of tasks (SLURM_ARRAY_TASK_COUNT); all slices write into OUT (data/shard-i-of-n.jsonl),
#      `tanuki synth merge OUT --out MERGED` checks them afterwards. Its progress line (every 10 s) goes to
#      this job's log (TANUKI_PROGRESS=0: none);
#   5. stops the server (SIGTERM reaches the ranks through Slurm as in slurm/serve.sh: they drain, exit 0).
#
# Stopping and requeue. `--signal=B:USR1@300` sends SIGUSR1 to this shell five minutes before the time
# limit; it is forwarded to the client, which starts no new conversation, gives the running ones its
# --grace (default 120 s) and exits 0; the server is stopped and the job requeued (REQUEUE_GRACE, default
# 240 s: a client still running then is requeued and stopped). The requeued job reloads the teacher and
# the client skips every conversation already written. Also requeued: a client that failed after this
# job wrote data (a crash loop ends at the first requeue that writes nothing). Not requeued: a slice that
# is complete (the client's summary, OUT/summary/shard-i-of-n.json, accounts for every conversation); a
# SIGTERM without SIGUSR1 (scancel, preemption): it is forwarded to the client, which stops the same way;
# the same command resumes the run. The data is appended whole lines with fsync: a kill loses at most the
# conversations in flight.
#
# DRY_RUN=1 prints the commands (the server's launch, the wait, the client) without checking the recipe.
# LOCAL=1 runs both here on CPU: `tanuki serve` on 2 CPU ranks (the MODE's split shrunk, as
# serve_nemotron4_340b.sh does) at 127.0.0.1 on PORT (default: a free port), the client against it.
#SBATCH --job-name=nemotron4-synth
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out
usage() {
  echo "usage: [MODE=h100x2|h200|h100-fp8] slurm/synth_nemotron4.sh CKPT RECIPE OUT [tanuki synth run options ...]" \
       "[-- tanuki serve options ...]" >&2
  exit 2
}
if [[ $# -lt 3 || "$1" == -* || "$2" == -* || "$3" == -* ]]; then usage; fi
absolute() { if [[ "$1" == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
CKPT=$(absolute "$1") RECIPE=$(absolute "$2") OUT=$(absolute "$3")
shift 3
synth_args=() serve_args=()
while [[ $# -gt 0 && "$1" != -- ]]; do synth_args+=("$1"); shift; done
if [[ $# -gt 0 ]]; then shift; serve_args=("$@"); fi

source "$(dirname "${BASH_SOURCE[0]}")/common.sh" 2>/dev/null || source "${SLURM_SUBMIT_DIR:-.}/slurm/common.sh"
SERVE=$REPO/slurm/serve_nemotron4_340b.sh

# --- the client's options: what this script sets is not taken twice --------------------------
shard="" i=0
while [[ $i -lt ${#synth_args[@]} ]]; do
  a=${synth_args[$i]}
  case $a in
    --out|--out=*|--backend|--backend=*|--base-url|--base-url=*|--ckpt|--ckpt=*)
      say "${a%%=*} is set by this script (OUT is the third argument; the teacher is the server it starts)"
      exit 2 ;;
    --shard) shard=${synth_args[$((i + 1))]:-} ;;
    --shard=*) shard=${a#--shard=} ;;
  esac
  i=$((i + 1))
done
array=()
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
  if [[ -n "$shard" ]]; then
    say "--shard $shard in an array job: the slice comes from the array (task ${SLURM_ARRAY_TASK_ID} of" \
        "${SLURM_ARRAY_TASK_COUNT:-?}); drop --shard"
    exit 2
  fi
  first=${SLURM_ARRAY_TASK_MIN:-0} count=${SLURM_ARRAY_TASK_COUNT:-}
  index=$(( SLURM_ARRAY_TASK_ID - first ))
  if [[ ! "$count" =~ ^[1-9][0-9]*$ || "${SLURM_ARRAY_TASK_STEP:-1}" != 1 || $index -lt 0 || $index -ge $count ]]; then
    say "array task ${SLURM_ARRAY_TASK_ID} (first ${first}, ${count:-?} tasks, step ${SLURM_ARRAY_TASK_STEP:-1}):" \
        "submit a contiguous array, e.g. --array=0-15 for 16 slices"
    exit 2
  fi
  shard="$index/$count"
  array=(--shard "$shard")
fi

# --- where the server listens --------------------------------------------------------------------
host="" port=${PORT:-} chat=nemotron4
i=0
while [[ $i -lt ${#serve_args[@]} ]]; do
  a=${serve_args[$i]} next=${serve_args[$((i + 1))]:-}
  case $a in
    --host) host=$next ;; --host=*) host=${a#--host=} ;;
    --port) port=$next ;; --port=*) port=${a#--port=} ;;
    --chat) chat=$next ;; --chat=*) chat=${a#--chat=} ;;
  esac
  i=$((i + 1))
done
if [[ -z "$port" ]]; then
  if [[ "${LOCAL:-0}" == 1 ]]; then
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  else
    port=8000
  fi
fi
export PORT=$port
if [[ "${LOCAL:-0}" == 1 ]]; then
  url_host=${host:-127.0.0.1}
elif [[ -z "$host" || "$host" == 0.0.0.0 || "$host" == "::" ]]; then
  url_host=${MASTER_ADDR:-${SLURMD_NODENAME:-$HOSTNAME}}  # rank 0 runs on the first node, where this shell runs
else
  url_host=$host
fi
[[ "$url_host" == *:* && "$url_host" != \[* ]] && url_host="[$url_host]"
URL="http://$url_host:$port/v1"

client=("$PYTHON" -m megatron_tanuki.cli synth run "$RECIPE" --out "$OUT" --backend openai --base-url "$URL")
if [[ -n "${TANUKI_API_KEY:-}" ]]; then client+=(--api-key-env TANUKI_API_KEY); fi
client+=("${array[@]}" "${synth_args[@]}")
SERVE_WAIT=${SERVE_WAIT:-3600}
SERVE_POLL=${SERVE_POLL:-$([[ "${LOCAL:-0}" == 1 ]] && echo 1 || echo 5)}

# --- 1. checks, before anything starts ----------------------------------------------------------
serve_check=0 notes=$(mktemp)
serve_plan=$(DRY_RUN=1 bash "$SERVE" "$CKPT" "${serve_args[@]}" 2>"$notes") || serve_check=$?
serve_notes=$(cat "$notes"); rm -f "$notes"
if [[ "$serve_check" != 0 ]]; then
  echo "$serve_notes" >&2
  say "the server's launch was refused (above): nothing started"
  exit "$serve_check"
fi
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  if [[ -n "$serve_notes" ]]; then echo "$serve_notes" >&2; fi
  { grep -v '^export ' <<<"$serve_plan" || true; } | sed 's/ *$/ \&/'
  echo "# wait until GET $URL/models answers 200 (at most $SERVE_WAIT s)"
  run "${client[@]}"
  if [[ "${LOCAL:-0}" == 1 ]]; then
    echo "# stop the server: SIGTERM to it"
  else
    echo "# stop the server: scancel --signal=TERM ${SLURM_JOB_ID:-JOBID} (the ranks drain and exit)"
  fi
  exit 0
fi

check_client() {  # the client's own parser and checks (check_job), and the recipe's template vs the server's
  "$PYTHON" - "$chat" "${client[@]:3}" <<'EOF'
import sys

from megatron_tanuki.cli import build_parser

chat, argv = sys.argv[1], sys.argv[2:]
args = build_parser().parse_args(argv)  # a bad option: argparse's message, exit 2
try:
    from megatron_tanuki.synth.job import SynthJob, check_job

    job = SynthJob(**{k: v for k, v in vars(args).items() if k in SynthJob.__dataclass_fields__})
    recipe = check_job(job)
except Exception as e:  # noqa: BLE001 - one line for any refusal, as the CLI prints it
    print(f"[slurm] tanuki synth run: {e}", file=sys.stderr)
    sys.exit(2)
if recipe.teacher.chat is not None and recipe.teacher.chat != chat:
    print(f"[slurm] {recipe.path}: teacher.chat is {recipe.teacher.chat}, but the server renders with {chat}: "
          f"serve with -- --chat {recipe.teacher.chat} if that is the teacher's template, or fix the recipe",
          file=sys.stderr)
    sys.exit(2)
EOF
}
if ! check_client; then
  say "nothing started"
  exit 2
fi

# --- the server, in the background --------------------------------------------------------------
SERVER="" _TERM=0
stop_server() {  # SIGTERM to the server (serve.sh passes it to the ranks through Slurm); wait, bounded
  [[ -n "$SERVER" ]] || return 0
  local pid=$SERVER deadline=$((SECONDS + ${STOP_WAIT:-120}))
  SERVER=""
  if kill -0 "$pid" 2>/dev/null; then
    say "stopping the server"
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      say "the server is still running ${STOP_WAIT:-120} s after SIGTERM: killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}
trap 'status=$?; stop_server; exit $status' EXIT

_synth_term() {  # SIGTERM (scancel, preemption, the time limit): the client stops as after SIGUSR1
  _TRAPPED=1 _TERM=1
  if [[ "$_USR1" == 1 && "${LOCAL:-0}" != 1 ]]; then requeue "SIGTERM after SIGUSR1 (time limit)"; fi
  if [[ -n "$_CHILD" ]]; then
    say "SIGTERM: passed to the client (it finishes what it can and stops)"
    kill -TERM "$_CHILD" 2>/dev/null || true
  fi
}
trap _synth_term TERM INT
if [[ "${LOCAL:-0}" == 1 ]]; then trap - USR1 ALRM; fi

say "the teacher: $SERVE (MODE=${MODE:-h100x2}) at $URL"
bash "$SERVE" "$CKPT" "${serve_args[@]}" &
SERVER=$!

# --- 2. wait until it answers ---------------------------------------------------------------------
probe() {  # GET URL/models answers 200 (the key from the environment, never a command line)
  "$PYTHON" - "$URL/models" <<'EOF'
import os
import sys
import urllib.request

req = urllib.request.Request(sys.argv[1])
if os.environ.get("TANUKI_API_KEY"):
    req.add_header("Authorization", "Bearer " + os.environ["TANUKI_API_KEY"])
try:
    with urllib.request.urlopen(req, timeout=10) as resp:
        sys.exit(0 if resp.status == 200 else 1)
except Exception:  # noqa: BLE001 - not up yet
    sys.exit(1)
EOF
}
start=$SECONDS
until probe; do
  if ! kill -0 "$SERVER" 2>/dev/null; then
    s=0; wait "$SERVER" || s=$?
    SERVER=""
    say "the server exited (status $s) before answering GET $URL/models: see the log above and $LOG_DIR"
    exit 1
  fi
  if (( SECONDS - start >= SERVE_WAIT )); then
    say "the server did not answer GET $URL/models within SERVE_WAIT=$SERVE_WAIT s: stopping it"
    exit 1
  fi
  if [[ "$_USR1" == 1 || "$_TERM" == 1 ]]; then
    say "stopped while the server was loading"
    [[ "$_USR1" == 1 && "${LOCAL:-0}" != 1 ]] && requeue "the time limit came before the server was up"
    exit 0
  fi
  sleep "$SERVE_POLL"
done
say "the server answers at $URL after $(( SECONDS - start )) s"

# --- 3. the client ---------------------------------------------------------------------------------------
written() {  # bytes of data and rejects in OUT: did this job make progress?
  { find "$OUT/data" "$OUT/rejects" -name '*.jsonl' -printf '%s\n' 2>/dev/null || true; } |
    awk '{s += $1} END {print s + 0}'
}
complete() {  # this slice's summary accounts for every conversation of it
  local i=${shard%/*} n=${shard#*/}
  [[ -n "$shard" ]] || { i=0 n=1; }
  "$PYTHON" - "$(printf '%s/summary/shard-%05d-of-%05d.json' "$OUT" "$i" "$n")" <<'EOF'
import json
import sys

try:
    s = json.load(open(sys.argv[1]))
    sys.exit(0 if s["abandoned"] == 0 and s["skipped"] + s["completed"] + s["rejected"] >= s["target"] else 1)
except (OSError, ValueError, KeyError):
    sys.exit(1)
EOF
}
before=$(written)
export TANUKI_PROGRESS=${TANUKI_PROGRESS:-1}  # the client's progress line every 10 s, into the job's log
status=0
_launch "${client[@]}" || status=$?
stop_server

if [[ "${LOCAL:-0}" == 1 ]]; then
  say "tanuki synth run exited with status $status"
  exit "$status"
fi
if [[ "$status" == 0 ]]; then
  if complete; then
    say "OUT=$OUT: ${shard:-0/1} complete"
  elif [[ "$_USR1" == 1 ]]; then
    requeue "the time limit came with conversations left"
  else
    say "the client stopped before the end (SIGTERM without SIGUSR1: scancel or preemption): not requeued;" \
        "the same command resumes it"
  fi
  exit 0
fi
if [[ "$_USR1" == 1 ]]; then
  requeue "the client exited with $status after SIGUSR1"
elif [[ "$(written)" != "$before" ]]; then
  requeue "the client failed (exit $status) after writing conversations in this job"
else
  say "the client failed (exit $status) without writing anything: not requeued"
fi
exit "$status"
