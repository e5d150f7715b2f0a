"""Conversion benchmark (what `tools/bench_convert.py` runs).

``--source hf`` (default): writes a synthetic Tanuki-shaped HF checkpoint (``--layers`` full-width
layers of a preset, bf16, 5 GB shards), then times, each in its own process so peak RSS is its own:
  raw      read every tensor with safetensors and write the same bytes to a new folder
  hf->mcore / mcore->hf   the real conversions
and prints GB/s, the ratio to the raw read+write, and peak RSS against the largest tensor.

``--source nemo``: writes a synthetic unpacked ``.nemo`` folder of a Nemotron-4 shape in the released
checkpoint's format (see :func:`make_nemo_checkpoint`), then times a raw read of every tensor through
the zarr reader and ``nemo-to-mcore``. Its memory claim is "peak RSS about twice the largest tensor
read at once (one layer slice of a stacked array, or an unstacked one such as the embedding) plus a
fixed overhead", so the fixed overhead is measured too: each child first imports and converts a tiny
checkpoint of the same format, its peak RSS then is the baseline, and the report gives
(peak - baseline) / largest tensor. The default shape (``nemotron4-bench``) stacks enough layers
that reading a whole stacked array instead of one slice would show as a ratio well above 2.

It measures; it asserts nothing. The page cache is warm for every step alike (same disk).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch


def make_checkpoint(folder: str, preset: str, layers: int) -> tuple[int, int]:
    """A synthetic HF checkpoint; returns (total bytes, largest tensor bytes)."""
    from megatron_tanuki.convert import mcore_io
    from megatron_tanuki.convert.engine import expected_hf_shapes, write_hf_side
    from megatron_tanuki.convert.safetensors_io import ShardedWriter
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.tanuki.hf_config import to_hf_config

    cfg = registry.get_preset(preset).replace(num_layers=layers)
    _, _, mcore_shapes = mcore_io.model_layout(cfg, torch.bfloat16)
    plan = [(n, s, torch.bfloat16) for n, s in expected_hf_shapes(cfg, cfg.vocab_size, mcore_shapes).items()]
    os.makedirs(folder)
    writer = ShardedWriter(folder, plan)
    g = torch.Generator().manual_seed(0)
    total = largest = 0
    for name, shape, dtype in plan:
        t = torch.empty(shape, dtype=dtype).uniform_(-0.05, 0.05, generator=g)
        writer.add(name, t)
        total += t.numel() * 2
        largest = max(largest, t.numel() * 2)
    writer.close()
    write_hf_side(folder, to_hf_config(cfg), cfg)
    return total, largest


def raw_copy(src: str, dst: str) -> None:
    """The I/O floor: read each tensor through safetensors, write the same bytes (streamed)."""
    from megatron_tanuki.convert.safetensors_io import HFCheckpoint, ShardedWriter

    ck = HFCheckpoint(src)
    os.makedirs(dst)
    names = ck.names()
    w = ShardedWriter(dst, [(n, ck.shape(n), ck.dtype(n)) for n in names])
    for n in names:
        w.add(n, ck.get(n))
    w.close()


_STEP = """
import resource, sys, time
{imports}
{warmup}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
{call}
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, base)
"""


def _timed(imports: str, call: str, warmup: str = "") -> tuple[float, int, int]:
    """Seconds of ``call`` (imports and ``warmup`` excluded), the process's peak RSS, and its peak RSS
    before ``call`` (the baseline: imports, plus whatever ``warmup`` loaded), in a fresh process."""
    code = _STEP.format(imports=imports, warmup=warmup, call=call)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    secs, rss, base = out.stdout.strip().splitlines()[-1].split()
    return float(secs), int(rss), int(base)


def run(preset: str = "tanuki-8x8b", layers: int = 1, workdir: str | None = None, keep: bool = False) -> dict:
    work = tempfile.mkdtemp(prefix="tanuki-bench-convert-", dir=workdir)
    try:
        hf, raw, mc, back = (os.path.join(work, n) for n in ("hf", "raw", "mcore", "back"))
        t0 = time.perf_counter()
        total, largest = make_checkpoint(hf, preset, layers)
        gen = time.perf_counter() - t0
        steps = {
            "raw_read_write": ("from megatron_tanuki.convert.bench import raw_copy", f"raw_copy({hf!r}, {raw!r})"),
            "hf_to_mcore": ("from megatron_tanuki.convert import engine", f"engine.hf_to_mcore({hf!r}, {mc!r})"),
            "mcore_to_hf": ("from megatron_tanuki.convert import engine", f"engine.mcore_to_hf({mc!r}, {back!r})"),
        }
        res = {"source": "hf", "preset": preset, "layers": layers, "checkpoint_gb": round(total / 1e9, 3),
               "largest_tensor_gb": round(largest / 1e9, 3), "generate_s": round(gen, 1)}
        for name, (imports, call) in steps.items():
            secs, rss, base = _timed(imports, call)
            res[name] = {"seconds": round(secs, 2), "gb_per_s": round(total / 1e9 / secs, 3),
                         "peak_rss_gb": round(rss / 1e9, 3), "baseline_rss_gb": round(base / 1e9, 3)}
        raw_s = res["raw_read_write"]["seconds"]
        for name in ("hf_to_mcore", "mcore_to_hf"):
            res[name]["ratio_to_raw"] = round(raw_s / res[name]["seconds"], 3)
            res[name]["rss_budget_gb"] = round((2 * largest + 1.5e9) / 1e9, 3)
        return res
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="HF <-> Megatron conversion throughput and memory")
    p.add_argument("--preset", default="tanuki-8x8b")
    p.add_argument("--layers", type=int, default=1, help="full-width layers (1 layer of 8x8B is ~3.9 GB)")
    p.add_argument("--workdir", default=None, help="where to write (default: the system temp dir)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run(a.preset, a.layers, a.workdir, a.keep)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['preset']} x{r['layers']} layers: {r['checkpoint_gb']} GB checkpoint, largest tensor "
          f"{r['largest_tensor_gb']} GB (generated in {r['generate_s']} s)")
    for name in ("raw_read_write", "hf_to_mcore", "mcore_to_hf"):
        s = r[name]
        extra = (f", {s['ratio_to_raw'] * 100:.0f}% of raw I/O, RSS budget {s['rss_budget_gb']} GB"
                 if "ratio_to_raw" in s else "")
        print(f"  {name:15s} {s['seconds']:7.2f} s  {s['gb_per_s']:6.3f} GB/s  peak RSS {s['peak_rss_gb']:.2f} GB{extra}")
    return 0
