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

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import yaml


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


# A Nemotron-4 shape for the NeMo case: big enough that the layer slices (fc1/fc2 34 MB) and the
# embedding (131 MB) dwarf allocator noise, 16 layers so a whole stacked fc1 array (537 MB) is far above
# twice the embedding, small enough to run in well under a minute on 2 cores (1.7 GB of weights).
NEMO_BENCH = dict(name="nemotron4-bench", vocab_size=32000, hidden_size=2048, num_layers=16,
                  num_attention_heads=16, num_query_groups=8, ffn_hidden_size=8192, max_position_embeddings=4096)
NEMO_TP = 8  # the release's tensor parallel size: one chunk per (layer, TP shard)
_STACKED_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def nemo_config(preset: str, layers: int | None = None):
    """The Nemotron4Config of ``preset`` (a Nemotron-4 preset or ``nemotron4-bench``), ``layers`` overriding.
    (The presets module directly, not the registry: that imports megatron-core, seconds for nothing here.)"""
    from megatron_tanuki.models.nemotron4.config import PRESETS, Nemotron4Config

    presets = {**PRESETS, NEMO_BENCH["name"]: Nemotron4Config(**NEMO_BENCH)}
    if preset not in presets:
        raise ValueError(f"preset {preset!r} is not a Nemotron-4 preset (the NeMo case writes Nemotron-4 "
                         f"checkpoints); known: {', '.join(sorted(presets))}")
    return presets[preset].replace(num_layers=layers) if layers else presets[preset]


def nemo_arrays(cfg) -> list[tuple[str, tuple[int, ...], str, int | None]]:
    """(zarr key, global shape, zarr dtype, TP-split axis or None) of each array of a NeMo GPT checkpoint,
    as NeMo/megatron-core's zarr strategy saves the TE spec: stacked keys carry the layer on axis 0,
    column-parallel weights split their output rows, row-parallel ones their input columns, the
    vocabulary-parallel embedding and output layer their rows; LayerNorms (fp32) are not split."""
    L, h, f, v = cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim
    lay = "model.decoder.layers."
    arrays = [("model.embedding.word_embeddings.weight", (v, h), "bfloat16", 0)]
    for mod in ("self_attention.linear_qkv", "mlp.linear_fc1"):
        arrays += [(f"{lay}{mod}.layer_norm_{p}", (L, h), "<f4", None) for p in ("weight", "bias")]
    arrays += [(f"{lay}self_attention.linear_qkv.weight", (L, qkv, h), "bfloat16", 1),
               (f"{lay}self_attention.linear_proj.weight", (L, h, cfg.num_attention_heads * cfg.head_dim), "bfloat16", 2),
               (f"{lay}mlp.linear_fc1.weight", (L, f, h), "bfloat16", 1),
               (f"{lay}mlp.linear_fc2.weight", (L, h, f), "bfloat16", 2)]
    arrays += [(f"model.decoder.final_layernorm.{p}", (h,), "<f4", None) for p in ("weight", "bias")]
    arrays.append(("model.output_layer.weight", (v, h), "bfloat16", 0))
    if cfg.reward_outputs:
        arrays += [("model.rm_head.weight", (cfg.reward_outputs, h), "bfloat16", None),
                   ("model.rm_head.bias", (cfg.reward_outputs,), "bfloat16", None)]
    return arrays


def _nemo_yaml(cfg) -> dict:
    """model_config.yaml with the fields NeMo's own Nemotron-4 configs carry (the test fixture's keys)."""
    return {"mcore_gpt": True, "transformer_engine": True, "precision": "bf16",
            "tensor_model_parallel_size": NEMO_TP, "pipeline_model_parallel_size": 1,
            "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "ffn_hidden_size": cfg.ffn_hidden_size,
            "num_attention_heads": cfg.num_attention_heads, "num_query_groups": cfg.num_query_groups,
            "kv_channels": None, "max_position_embeddings": cfg.max_position_embeddings,
            "encoder_seq_length": cfg.max_position_embeddings, "position_embedding_type": "rope",
            "rotary_percentage": cfg.rotary_percent, "rotary_base": int(cfg.rope_theta),
            "activation": "squared-relu", "normalization": "layernorm1p", "layernorm_epsilon": cfg.norm_eps,
            "bias": False, "share_embeddings_and_output_weights": cfg.tie_embeddings,
            "attention_dropout": 0.0, "hidden_dropout": 0.0, "init_method_std": 0.02, "dist_ckpt_format": "zarr",
            "tokenizer": {"library": "sentencepiece", "type": None, "model": None, "vocab_size": cfg.vocab_size}}


def make_nemo_checkpoint(folder: str, cfg, seed: int = 0) -> dict:
    """A synthetic unpacked ``.nemo`` folder of ``cfg``, written one chunk at a time (never a whole tensor).

    The format of NVIDIA's Nemotron-4 release and of tests/data/nemo-zarr-tiny: ``model_config.yaml`` and
    ``model_weights/`` = metadata.json (``sharded_backend: zarr``), common.pt, one Zarr-v2 array folder
    per key (``.zarray`` JSON as zarr 2.x writes it, no compressor, ``"dtype": "bfloat16"`` for the
    matrices, raw little-endian C-order chunk files named ``i.j.k``), one chunk per (layer, TP=8 shard),
    and ``*._extra_state/shard_{layer}_{layers}.pt`` pickles beside the stacked linears. Returns the
    byte counts: ``total``, ``largest_tensor`` (one layer slice or one unstacked array -- what the
    reader materialises at once) and ``largest_layer_slice`` (stacked arrays only).
    """
    weights = os.path.join(folder, "model_weights")
    os.makedirs(weights)
    g = torch.Generator().manual_seed(seed)
    total = largest = largest_slice = 0
    for key, shape, zdtype, split in nemo_arrays(cfg):
        stacked = key.startswith("model.decoder.layers.")
        chunks = list(shape)
        if stacked:
            chunks[0] = 1
        if split is not None:
            if shape[split] % NEMO_TP:
                raise ValueError(f"{key}: axis {split} of {list(shape)} does not split over TP={NEMO_TP}")
            chunks[split] = shape[split] // NEMO_TP
        adir = os.path.join(weights, key)
        os.makedirs(adir)
        with open(os.path.join(adir, ".zarray"), "w") as f:
            json.dump({"chunks": chunks, "compressor": None, "dtype": zdtype, "fill_value": None, "filters": None,
                       "order": "C", "shape": list(shape), "zarr_format": 2}, f, indent=4, sort_keys=True)
        dtype = torch.bfloat16 if zdtype == "bfloat16" else torch.float32
        for index in itertools.product(*[range(s // c) for s, c in zip(shape, chunks)]):
            t = torch.empty(chunks, dtype=dtype).uniform_(-0.05, 0.05, generator=g)
            with open(os.path.join(adir, ".".join(map(str, index))), "wb") as f:
                f.write(t.view(torch.uint8).numpy())  # the host's byte order: little-endian, as zarr's "<"
        nbytes = math.prod(shape) * (2 if dtype == torch.bfloat16 else 4)
        total += nbytes
        one = nbytes // shape[0] if stacked else nbytes
        largest = max(largest, one)
        largest_slice = max(largest_slice, one if stacked else 0)
    for mod in _STACKED_MODULES:
        edir = os.path.join(weights, f"model.decoder.layers.{mod}._extra_state")
        os.makedirs(edir)
        for i in range(cfg.num_layers):  # TE's FP8 metadata; None when FP8 never ran (the reader skips them)
            torch.save(None, os.path.join(edir, f"shard_{i}_{cfg.num_layers}.pt"))
    torch.save({}, os.path.join(weights, "common.pt"))
    with open(os.path.join(weights, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "zarr", "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}, f)
    with open(os.path.join(folder, "model_config.yaml"), "w") as f:
        yaml.safe_dump(_nemo_yaml(cfg), f, sort_keys=False)
    return {"total": total, "largest_tensor": largest, "largest_layer_slice": largest_slice}


def raw_read_nemo(src: str, dst: str) -> None:
    """The NeMo I/O floor: every tensor through the zarr reader, its bytes appended to one file."""
    from megatron_tanuki.convert.nemo_zarr import NemoCheckpoint

    ck = NemoCheckpoint(src)
    with open(dst, "wb") as f:
        for n in ck.names():
            f.write(ck.get(n).view(torch.uint8).numpy())


_STEP = """
import resource, sys, time
{imports}
{warmup}
def rss(field):  # bytes; /proc/self/status where there is one, else the process's peak
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith(field + ":"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
try:  # restart VmHWM here, so what follows is the call's own peak (import transients excluded)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
base = rss("VmRSS")
t = time.perf_counter()
{call}
secs = time.perf_counter() - t
print(secs, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, base, rss("VmHWM"))
"""


def _timed(imports: str, call: str, warmup: str = "") -> tuple[float, int, int, int]:
    """In a fresh process: seconds of ``call`` (imports and ``warmup`` excluded), the process's peak RSS
    (imports included), its RSS just before ``call`` (the baseline: imports plus what ``warmup`` left
    resident) and its peak RSS during ``call`` (Linux's VmHWM reset before it; where that cannot be
    reset, the process's peak -- an overestimate)."""
    code = _STEP.format(imports=imports, warmup=warmup, call=call)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    secs, rss, base, call_peak = out.stdout.strip().splitlines()[-1].split()
    return float(secs), int(rss), int(base), int(call_peak)


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
            secs, rss, base, _ = _timed(imports, call)
            res[name] = {"seconds": round(secs, 2), "gb_per_s": round(total / 1e9 / secs, 3),
                         "peak_rss_gb": round(rss / 1e9, 3)}
        raw_s = res["raw_read_write"]["seconds"]
        for name in ("hf_to_mcore", "mcore_to_hf"):
            res[name]["ratio_to_raw"] = round(raw_s / res[name]["seconds"], 3)
            res[name]["rss_budget_gb"] = round((2 * largest + 1.5e9) / 1e9, 3)
        return res
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def run_nemo(preset: str = NEMO_BENCH["name"], layers: int | None = None, workdir: str | None = None,
             keep: bool = False) -> dict:
    """The NeMo case: synthetic zarr folder -> raw read, and -> ``nemo-to-mcore`` (see the module doc)."""
    cfg = nemo_config(preset, layers)
    work = tempfile.mkdtemp(prefix="tanuki-bench-nemo-", dir=workdir)
    try:
        src, raw, mc = (os.path.join(work, n) for n in ("nemo", "raw.bin", "mcore"))
        warm_src, warm_out = os.path.join(work, "warmup-nemo"), os.path.join(work, "warmup-mcore")
        t0 = time.perf_counter()
        sizes = make_nemo_checkpoint(src, cfg)
        gen = time.perf_counter() - t0
        make_nemo_checkpoint(warm_src, nemo_config("nemotron4-tiny", 2))  # same format, kilobytes
        total, largest, largest_slice = sizes["total"], sizes["largest_tensor"], sizes["largest_layer_slice"]
        res = {"source": "nemo", "preset": preset, "layers": cfg.num_layers, "tp": NEMO_TP,
               "checkpoint_bytes": total, "checkpoint_gb": round(total / 1e9, 3),
               "largest_tensor_bytes": largest, "largest_tensor_gb": round(largest / 1e9, 3),
               "largest_layer_slice_bytes": largest_slice, "largest_layer_slice_gb": round(largest_slice / 1e9, 3),
               "generate_s": round(gen, 1), "nemo": src if keep else None, "output": mc if keep else None}
        warmup = f"nemo.nemo_to_mcore({warm_src!r}, {warm_out!r})"
        steps = {
            "raw_read_write": ("from megatron_tanuki.convert.bench import raw_read_nemo", f"raw_read_nemo({src!r}, {raw!r})"),
            "nemo_to_mcore": ("from megatron_tanuki.convert import nemo", f"nemo.nemo_to_mcore({src!r}, {mc!r})"),
        }
        for name, (imports, call) in steps.items():
            secs, rss, base, peak = _timed(imports, call, warmup if name == "nemo_to_mcore" else "")
            res[name] = {"seconds": round(secs, 3), "gb_per_s": round(total / 1e9 / secs, 3),
                         "peak_rss_gb": round(rss / 1e9, 3), "baseline_rss_bytes": base,
                         "baseline_rss_gb": round(base / 1e9, 3), "call_peak_rss_bytes": peak,
                         "call_peak_rss_gb": round(peak / 1e9, 3), "rss_over_baseline_gb": round((peak - base) / 1e9, 3)}
        conv = res["nemo_to_mcore"]
        over = conv["call_peak_rss_bytes"] - conv["baseline_rss_bytes"]
        conv["ratio_to_raw"] = round(res["raw_read_write"]["seconds"] / conv["seconds"], 3)
        conv["rss_over_largest_tensor"] = round(over / largest, 3)
        conv["rss_over_largest_layer_slice"] = round(over / largest_slice, 3)
        conv["rss_budget_gb"] = round((2 * largest + conv["baseline_rss_bytes"]) / 1e9, 3)
        return res
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Conversion throughput and memory: HF <-> Megatron, or NeMo zarr -> Megatron")
    p.add_argument("--source", choices=("hf", "nemo"), default="hf",
                   help="hf: synthetic Tanuki HF checkpoint, hf-to-mcore and back; nemo: synthetic NeMo zarr "
                        "folder (Nemotron-4 release format), nemo-to-mcore")
    p.add_argument("--preset", default=None, help=f"hf: a Tanuki preset (default tanuki-8x8b); nemo: a Nemotron-4 "
                   f"preset or {NEMO_BENCH['name']} (default)")
    p.add_argument("--layers", type=int, default=None, help="hf: full-width layers (default 1; 1 layer of 8x8B is "
                   "~3.9 GB); nemo: overrides the preset's layer count (nemotron4-bench: 16, 1.7 GB)")
    p.add_argument("--workdir", default=None, help="where to write (default: the system temp dir)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.source == "nemo":
        try:
            nemo_config(a.preset or NEMO_BENCH["name"], a.layers)
        except ValueError as e:
            p.error(str(e))
        r = run_nemo(a.preset or NEMO_BENCH["name"], a.layers, a.workdir, a.keep)
    else:
        r = run(a.preset or "tanuki-8x8b", a.layers or 1, a.workdir, a.keep)
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['preset']} x{r['layers']} layers: {r['checkpoint_gb']} GB checkpoint, largest tensor "
          f"{r['largest_tensor_gb']} GB (generated in {r['generate_s']} s)")
    steps = ("raw_read_write", "nemo_to_mcore") if a.source == "nemo" else ("raw_read_write", "hf_to_mcore", "mcore_to_hf")
    for name in steps:
        s = r[name]
        extra = (f", {s['ratio_to_raw'] * 100:.0f}% of raw I/O, RSS budget {s['rss_budget_gb']} GB"
                 if "ratio_to_raw" in s else "")
        print(f"  {name:15s} {s['seconds']:7.2f} s  {s['gb_per_s']:6.3f} GB/s  peak RSS {s['peak_rss_gb']:.2f} GB{extra}")
    if a.source == "nemo":
        c = r["nemo_to_mcore"]
        mb = lambda n: f"{n / 1e6:.1f} MB"
        print(f"  nemo_to_mcore peak - baseline ({mb(c['baseline_rss_bytes'])}) = "
              f"{mb(c['call_peak_rss_bytes'] - c['baseline_rss_bytes'])} = {c['rss_over_largest_tensor']:.2f} x the "
              f"largest tensor ({mb(r['largest_tensor_bytes'])}) = {c['rss_over_largest_layer_slice']:.2f} x the "
              f"largest layer slice ({mb(r['largest_layer_slice_bytes'])})")
    return 0
