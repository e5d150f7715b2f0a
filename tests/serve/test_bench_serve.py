"""tools/bench_serve.py end to end on the tiny shape: a real `tanuki serve` subprocess on loopback,
streaming clients, then the same requests offline. The counts are exact (greedy, seeded random
weights: every request runs to max_tokens and the server's text equals the offline engine's); the
timing fields exist. A benchmark measures: nothing here asserts a speed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_tanuki.serve import bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", "SLURM_STEP_ID", "TANUKI_DEBUG")},
       "TANUKI_PROGRESS": "0"}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_serve") / "serve.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_serve.py"), "--shape", "tiny", "--requests", "6",
           "--concurrency", "3", "--prompt-len", "16", "--max-tokens", "8", "--kv-memory-gb", "0.05",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out, encoding="utf-8") as f:
        return proc.stdout, json.load(f)


def test_counts_are_exact_on_both_sides(ran):
    _, r = ran
    assert (r["shape"], r["requests"], r["concurrency"], r["prompt_len"], r["max_tokens"]) == ("tiny", 6, 3, 16, 8)
    assert r["expected_tokens"] == 48
    s, f = r["server"], r["offline"]
    assert (s["completed"], s["errors"], s["first_error"], s["missing_usage"]) == (6, 0, None, 0)
    assert s["prompt_tokens"] == [16]  # the token-id prompt reached the engine as sent
    assert s["finish_reasons"] == f["finish_reasons"] == {"length": 6}
    assert s["tokens"] == f["tokens"] == 48
    a = r["offline_all"]
    assert a["tokens"] == 48 and a["finish_reasons"] == {"length": 6}
    # one step per token: two waves of 3 (the clients' concurrency), or all 6 together (tanuki generate)
    assert (f["errors"], f["steps"], a["errors"], a["steps"]) == (0, 16, 0, 8)
    assert r["same_as_offline"] == 6  # greedy: the streamed text is the offline engine's
    assert s["exit_code"] == 0  # SIGTERM: drained and exited cleanly


def test_latency_fields(ran):
    _, r = ran
    s = r["server"]
    assert s["ttft_ms"]["n"] == 6 and s["tpot_ms"]["n"] == 6
    assert s["itl_ms"]["n"] == s["chunks"] - 6  # a gap between every two text chunks of a stream
    for name in ("ttft_ms", "itl_ms", "tpot_ms"):
        x = s[name]
        assert 0 < x["p50"] <= x["p99"], name
    for side in ("server", "offline", "offline_all"):
        assert r[side]["seconds"] > 0 and r[side]["tokens_per_s"] > 0, side
    assert r["server_vs_offline"] > 0 and r["server_vs_offline_all"] > 0
    assert s["server_cpu_s"] > 0 and s["client_cpu_s"] > 0 and r["offline"]["cpu_s"] > 0
    assert r["attention_backend"] in ("paged-sdpa", "torch-varlen", "flash-attn")


def test_printed_report(ran):
    out, _ = ran
    for line in ("6 requests: 16 prompt tokens, max_tokens 8 (greedy), 3 concurrent streaming clients",
                 "6/6 completed, 0 errors", "exit code 0", "TTFT p50", "ITL  p50", "TPOT p50", "CPU: server process",
                 "server / offline throughput at concurrency 3:",
                 "(all submitted, as tanuki generate)", "same text and token count as offline: 6/6"):
        assert line in out, line


def test_bad_options_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"^--concurrency 0: must be at least 1$"):
        bench.check(bench.BenchOptions(concurrency=0))
    with pytest.raises(ValueError, match=r"^--shape 'huge': expected one of \['cpu', 'tanuki-8b', 'tiny'\]$"):
        bench.check(bench.BenchOptions(shape="huge"))
    with pytest.raises(ValueError, match=r"^give --shape \(random weights\) or --ckpt \(a checkpoint\), not both$"):
        bench.check(bench.BenchOptions(shape="tiny", ckpt=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        bench.check(bench.BenchOptions(ckpt=str(tmp_path / "nope")))
