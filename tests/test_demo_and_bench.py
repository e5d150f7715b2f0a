"""The README's main job and the benchmark, run the way a user runs them (short settings)."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")


CPU_ONLY = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU settings; GPU host")


@CPU_ONLY
def test_demo_loss_falls_over_two_ep_ranks():
    r = subprocess.run([TANUKI, "demo", "--llm", "--steps", "12"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "EP=2" in out and "on 2 CPU ranks" in out
    m = re.search(r"held-out loss ([\d.]+) -> ([\d.]+) \(falls\)", out)
    assert m, out
    before, after = map(float, m.groups())
    assert before > 10.5  # ~ln(65024): an untrained model
    assert after < before - 1.0
    steps = [int(s) for s in re.findall(r"step\s+(\d+)/12", out)]
    assert steps == [1, 10, 12]


@CPU_ONLY
def test_bench_train_step_runs_on_cpu():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_train_step.py"), "--json",
                        "--iters", "2", "--warmup", "1", "--seq", "32"],
                       capture_output=True, text=True, timeout=300, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["preset"] == "tanuki-8x8b-tiny" and res["device"] == "cpu" and res["seq"] == 32
    assert res["spec"] == "local+sdpa"
    assert res["step_s"] > 0 and res["tokens_per_s"] > 0 and res["peak_mem_gib"] > 0
    assert abs(res["tokens_per_s"] - 32 / res["step_s"]) / res["tokens_per_s"] < 0.01


def test_model_flops_match_the_h100_probe_accounting():
    from megatron_tanuki.bench import model_flops_per_step
    from megatron_tanuki.models.tanuki.config import TANUKI_8X8B

    # ../shared/probes/h100_baseline.result.json: model_flops_per_step_T = 20.21
    assert round(model_flops_per_step(TANUKI_8X8B, layers=2, seq=4096, batch=1) / 1e12, 2) == 20.21
