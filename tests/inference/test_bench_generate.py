"""tools/bench_generate.py end to end on the tiny shape: the fields it prints and writes exist, and
the token counts are exact (every request produces exactly its length on both sides). A benchmark
measures; nothing here asserts a speed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_tanuki.inference import bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = dict(requests=6, batch=2, prompt_len=16, out_min=2, out_max=12)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_generate.py"), "--shape", "tiny",
           "--workloads", "mixed,uniform", "--json", str(out)]
    for k, v in ARGS.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "TANUKI_PROGRESS": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, encoding="utf-8") as f:
        return proc.stdout, json.load(f)


def test_mixed_workload_counts_are_exact(ran):
    _, r = ran
    lengths = bench.make_workload("mixed", 6, 16, 2, 12, r["model"]["vocab_size"], 0).lengths
    w = r["workloads"]["mixed"]
    assert (w["requests"], w["expected_tokens"]) == (6, sum(lengths))
    for side in ("hf", "engine", "engine_static"):
        assert w[side]["tokens"] == sum(lengths), side
        assert w[side]["seconds"] > 0 and w[side]["tokens_per_s"] > 0, side
    batches = [lengths[i:i + 2] for i in range(0, 6, 2)]
    assert w["hf"]["batches"] == 3
    assert w["hf"]["generated_tokens"] == sum(2 * max(b) for b in batches)  # HF runs each batch to its longest
    # static batching: one step per token of each batch's longest request
    assert w["engine_static"]["steps"] == sum(max(b) for b in batches)
    assert w["engine"]["steps"] <= w["engine_static"]["steps"]
    # same weights, greedy fp32: the same tokens on both sides and in both engine modes
    assert (w["same_as_hf"], w["static_same_as_engine"]) == (6, 6)
    assert w["engine_vs_hf"] > 0 and w["engine_vs_static"] > 0


def test_uniform_workload_is_one_full_batch(ran):
    _, r = ran
    w = r["workloads"]["uniform"]
    assert (w["requests"], w["out_min"], w["out_max"]) == (2, 12, 12)
    assert w["hf"]["tokens"] == w["engine"]["tokens"] == w["hf"]["generated_tokens"] == 24
    assert w["engine"]["steps"] == 12
    assert "engine_static" not in w  # one batch of equal lengths: static and continuous are the same run


def test_printed_report_and_run_fields(ran):
    out, r = ran
    assert (r["shape"], r["dtype"], r["batch"], r["prompt_len"], r["weights"]) == ("tiny", "fp32", 2, 16, "checkpoint")
    assert r["attention_backend"] in ("paged-sdpa", "torch-varlen", "flash-attn")
    assert r["model"]["hidden_size"] == 64 and r["params_B"] > 0
    for line in ("workload mixed: 6 requests", "workload uniform: 2 requests", "transformers generate",
                 "engine (continuous batching)", "engine (static batches)", "engine / transformers:",
                 "continuous / static batching:"):
        assert line in out, line


def test_bad_output_lengths_are_named():
    with pytest.raises(ValueError, match=r"^output lengths 5\.\.4: need 1 <= out_min <= out_max$"):
        bench.make_workload("mixed", 2, 4, 5, 4, 100, 0)
    with pytest.raises(ValueError, match=r"^workload 'bursty': expected 'mixed' or 'uniform'$"):
        bench.make_workload("bursty", 2, 4, 1, 4, 100, 0)
