#!/usr/bin/env bash
# The cluster path on one GPU, in a few minutes: what CPU tests cannot prove (issue 9).
#
#   bash tools/gpu_smoke.sh [OUT_DIR]        # default runs/gpu_smoke; prints a summary at the end
#
# For each backend -- the local spec (TANUKI_TE=0: SDPA attention, our norms) and, when
# transformer_engine imports, the TE spec -- it runs tools/gpu_smoke.py: every model kind built on
# the GPU with nothing left on the CPU, a 2-layer full-width Tanuki-vision-8x8B forward+backward on a
# packed (THD) batch, the tiny Tanuki-vision trained one packed step (`tanuki train`), saved, resumed
# for one more step, exported to LLaVA-JP and verified against transformers. Then the benchmarks:
# tools/bench_train_step.py (LLM and --vlm) beside ../shared/probes/h100_sdpa.py when present.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-runs/gpu_smoke}
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_smoke: no GPU visible to torch ($PYTHON): this script checks the GPU path and needs one." >&2
  echo "gpu_smoke: on a CPU machine run 'make test' instead." >&2
  exit 2
fi
mkdir -p "$OUT"
export NVIDIA_TF32_OVERRIDE=0   # fp32 parity (verify) must not run its GEMMs / convolutions in TF32
status=0
backends=(local)
"$PYTHON" -c "import transformer_engine.pytorch" 2>/dev/null && backends+=(te)
for b in "${backends[@]}"; do
  echo "== gpu_smoke: backend $b =="
  if [[ $b == local ]]; then export TANUKI_TE=0; else unset TANUKI_TE; fi
  timeout 600 "$PYTHON" tools/gpu_smoke.py --backend "$b" --out "$OUT/$b" || status=1
done
unset TANUKI_TE
echo "== gpu_smoke: benchmarks =="
timeout 300 "$PYTHON" tools/bench_train_step.py --layers 2 || status=1
timeout 300 "$PYTHON" tools/bench_train_step.py --vlm --layers 2 || status=1
if [[ -f ../shared/probes/h100_sdpa.py ]]; then timeout 300 "$PYTHON" ../shared/probes/h100_sdpa.py || status=1; fi
echo "gpu_smoke: $([[ $status == 0 ]] && echo PASSED || echo FAILED) (backends: ${backends[*]})"
exit $status
