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
    """Default run of an MoE preset: both expert paths on one seed and input, and the data wait."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_train_step.py"), "--json",
                        "--layers", "1", "--iters", "1", "--warmup", "1", "--seq", "32", "--batch", "2"],
                       capture_output=True, text=True, timeout=300, check=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    paths = out["paths"]
    assert set(paths) == {"grouped", "sequential"}  # no TE on CPU
    for name, res in paths.items():
        assert res["preset"] == "tanuki-8x8b-tiny" and res["device"] == "cpu" and res["seq"] == 32
        assert res["spec"] == "local+sdpa" and res["path"] == name
        assert res["step_s"] > 0 and res["tokens_per_s"] > 0 and res["peak_mem_gib"] > 0
        assert abs(res["tokens_per_s"] - 64 / res["step_s"]) / res["tokens_per_s"] < 0.01
    g, sq = paths["grouped"], paths["sequential"]
    assert g["tokens"] == sq["tokens"] == 64
    assert (g["experts"], sq["experts"]) == ("GroupedGemmMLP", "SequentialMLP")
    assert g["grouped_kernel"] is True and sq["grouped_kernel"] is None  # CPU fp32: torch._grouped_mm runs
    assert abs(g["output_sum"] - sq["output_sum"]) <= 1e-6 * abs(sq["output_sum"])  # same block, same math
    assert out["grouped_vs_sequential"] == round(sq["step_s"] / g["step_s"], 3)
    d = out["data"]
    assert d["build_s_per_batch"] >= 0 and d["wait_s_per_step"] >= 0 and d["prefetch_depth"] == 2
    assert d["batch_shape"] == [2, 32] and d["samples"] >= 2 and d["documents"] > 0


def test_model_flops_match_the_h100_probe_accounting():
    from megatron_tanuki.bench import model_flops_per_step
    from megatron_tanuki.models.tanuki.config import TANUKI_8X8B

    # ../shared/probes/h100_baseline.result.json: model_flops_per_step_T = 20.21
    assert round(model_flops_per_step(TANUKI_8X8B, layers=2, seq=4096, batch=1) / 1e12, 2) == 20.21


def _demo(*args, timeout=1800):
    r = subprocess.run([TANUKI, "demo", *args], capture_output=True, text=True, timeout=timeout)
    return r, {k: (float(b) / 100, float(a) / 100) for k, b, a in re.findall(
        r"\[demo\] (\w+)\s+accuracy: before\s+([\d.]+)%\s+after\s+([\d.]+)%", r.stdout)}


@CPU_ONLY
def test_vlm_demo_runs_every_stage_and_exports_llava_jp(tmp_path):
    """`tanuki demo --quick`: the whole pipeline with a few steps per stage (not a result)."""
    r, acc = _demo("--quick", "--workdir", str(tmp_path), timeout=900)
    assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]  # 1: below 3x chance, expected here
    out = r.stdout
    for mode in ("(pretrain)", "(vlm_stage1)", "(vlm_stage2)"):
        assert mode in out and "EP=2" in out
    assert "tower probe accuracy" in out and "before 「" in out and "after  「" in out
    assert set(acc) == {"color", "shape", "position"}
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["model_type"] == "llava-jp" and cfg["mm_projector_type"] == "mlp2x_gelu"
    assert os.path.isfile(tmp_path / "stage2" / "finished")


@CPU_ONLY
@pytest.mark.slow
def test_vlm_demo_describes_held_out_images_at_3x_chance(tmp_path):
    """`make demo` itself (about 10 minutes on 2 cores)."""
    r, acc = _demo("--workdir", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    chance = {"color": 1 / 6, "shape": 1 / 5, "position": 1 / 9}
    for k, (before, after) in acc.items():
        assert after >= 3 * chance[k], (k, acc)
