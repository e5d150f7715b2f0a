"""Generation benchmark: the engine beside transformers ``generate`` (what tools/bench_generate.py runs).

One process, one set of random weights: a transformers ``LlamaForCausalLM`` is built from a Tanuki
shape, its weights go to megatron-core through the conversion table (``hf_to_mcore`` and a
checkpoint load, or the same table in memory), and both sides generate for the same prompts:

* ``hf``: transformers ``generate`` (greedy, dynamic cache), static batches of ``batch`` prompts in
  submission order. A batch runs until its longest request is done (max_new_tokens = the batch's
  longest length): the tokens generated past a request's own length are wasted work, so the rate
  counts only each request's own tokens (``generated_tokens`` says what HF actually produced).
  Sorting prompts by output length would favour HF with knowledge no real workload has.
* ``engine``: :class:`Engine` with continuous batching: every request submitted, at most ``batch``
  in flight, a finished request's slot taken by the next one in the following step.
* ``engine_static``: the same engine without continuous batching: a batch of ``batch`` requests
  runs to completion before the next is submitted (what HF does).

Prompts are ``prompt_len`` random token ids; output lengths are drawn (seeded) from
``out_min..out_max`` (the "mixed" workload) or all ``out_max`` (the "uniform" one, the H100 probe's
batch 64, 128 in / 256 out: HF 5.17 did 963 tok/s). Every request must produce exactly its length:
HF runs with ``eos_token_id=None``; the engine's token-id tokenizer has ``eos_id = -1``, an id
never sampled. Greedy on both sides, so the tokens can be compared as well (``same_as_hf``);
fp32 agrees closely, bf16 drifts after a few dozen tokens.

The CPU shapes run torch on one thread (``--threads`` to change): on a shared 2-core machine two
threads made transformers' many small per-token ops 12x slower (every op waits for a descheduled
worker thread), which measures the scheduler, not the work.

It measures and prints; it asserts nothing about speed.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch

from megatron_tanuki.models.tanuki.config import TANUKI_8B, TANUKI_8B_TINY, TanukiConfig


@dataclass(frozen=True)
class Shape:
    """A model shape with the workload size that suits the machine it is meant for."""

    model: TanukiConfig
    dtype: str            # fp32 | bf16
    batch: int            # requests in flight (HF batch size)
    requests: int         # requests of the mixed workload
    weights: str          # checkpoint (save, hf_to_mcore, load) | memory (the same table, no disk)
    note: str
    threads: int | None = None  # torch CPU threads (None: torch's default)


SHAPES = {
    "tiny": Shape(TANUKI_8B_TINY, "fp32", 2, 6, "checkpoint", "the test's smoke shape", threads=1),
    "cpu": Shape(TANUKI_8B.replace(name="bench-cpu", hidden_size=256, num_layers=4, num_attention_heads=4,
                                   num_query_groups=2, ffn_hidden_size=896, max_position_embeddings=512),
                 "fp32", 8, 24, "checkpoint", "a couple of minutes on 2 CPU cores", threads=1),
    # 16 GB through save + convert + load would cost minutes of a lent GPU: same table, in memory.
    "tanuki-8b": Shape(TANUKI_8B, "bf16", 64, 256, "memory", "Tanuki-8B on one GPU (random weights)"),
}


def default_shape() -> str:
    return "tanuki-8b" if torch.cuda.is_available() else "cpu"


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    lengths: list[int]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def make_workload(name: str, requests: int, prompt_len: int, out_min: int, out_max: int, vocab: int,
                  seed: int) -> Workload:
    """Seeded random prompts (ids 3.., past the special ids) and output lengths."""
    if not 1 <= out_min <= out_max:
        raise ValueError(f"output lengths {out_min}..{out_max}: need 1 <= out_min <= out_max")
    rng = random.Random(f"{seed}/{name}")
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(requests)]
    if name == "uniform":
        lengths = [out_max] * requests
    elif name == "mixed":
        lengths = [rng.randint(out_min, out_max) for _ in range(requests)]
    else:
        raise ValueError(f"workload {name!r}: expected 'mixed' or 'uniform'")
    return Workload(name, prompts, lengths)


class TokenIds:
    """The engine's tokenizer for a workload of token ids. ``eos_id = -1`` is never sampled, so each
    request runs to its own max_tokens: the benchmark's ignore-EOS."""

    eos_id = -1
    bos_id = 1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text, **_):
        raise TypeError("the generation benchmark feeds token ids, not text")

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(i)) for i in ids)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rate(tokens: int, seconds: float) -> float:
    return round(tokens / max(seconds, 1e-9), 1)


# ------------------------------------------------------------------------------ transformers

def build_hf(cfg: TanukiConfig, dtype: torch.dtype, device: str, seed: int):
    """A random transformers Llama of ``cfg``'s shape (HF's own init), eval mode, on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_tanuki.models.tanuki.hf_config import to_hf_config

    hf_cfg = LlamaConfig.from_dict(to_hf_config(cfg, cfg.vocab_size))
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = None  # never stop early: every request runs to its length
    return model.eval()


def hf_generate(model, work: Workload, batch: int, device: str) -> tuple[dict, list[list[int]]]:
    """transformers ``generate`` in static batches; returns (measurements, each request's tokens)."""
    from transformers import GenerationConfig

    def generate(prompts, new):
        ids = torch.tensor(prompts, device=device)
        gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                               pad_token_id=0)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        return out[:, ids.shape[1]:].tolist()

    generate(work.prompts[:2], 4)  # warm-up: first-call allocations and kernels
    _sync()
    outputs, generated, t0 = [], 0, time.perf_counter()
    for i in range(0, len(work.prompts), batch):
        lengths = work.lengths[i:i + batch]
        rows = generate(work.prompts[i:i + batch], max(lengths))
        generated += sum(len(r) for r in rows)
        outputs += [r[:n] for r, n in zip(rows, lengths)]
    _sync()
    seconds = time.perf_counter() - t0
    tokens = sum(len(r) for r in outputs)
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": _rate(tokens, seconds),
            "generated_tokens": generated, "batches": -(-len(work.prompts) // batch)}, outputs


# ------------------------------------------------------------------------------ megatron side

def _copy_weights(chunk, cfg: TanukiConfig, state: dict) -> None:
    """HF tensors into a TP=1 megatron model through the conversion table (no disk)."""
    from megatron_tanuki.convert import transforms
    from megatron_tanuki.convert.engine import bound_rules

    params = dict(chunk.named_parameters())
    done = set()
    with torch.no_grad():
        for rule, shape in bound_rules(cfg, cfg.vocab_size):
            params[rule.mcore].copy_(transforms.to_mcore(rule.transform, [state[n] for n in rule.hf], shape))
            done.add(rule.mcore)
    if set(params) - done:
        raise RuntimeError(f"the conversion table leaves {sorted(set(params) - done)} unset")


def megatron_model(cfg: TanukiConfig, dtype: str, hf_model, weights: str, folder: str):
    """The same weights as ``hf_model`` in a one-process megatron-core model."""
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_single_process

    if weights == "checkpoint":
        from megatron_tanuki.convert.engine import hf_to_mcore
        from megatron_tanuki.convert.verify import load_checkpoint

        hf_dir, ckpt = os.path.join(folder, "hf"), os.path.join(folder, "mcore")
        hf_model.save_pretrained(hf_dir)
        hf_to_mcore(hf_dir, ckpt)
    elif weights != "memory":
        raise ValueError(f"weights {weights!r}: expected 'checkpoint' or 'memory'")
    init_single_process(ParallelLayout(), cfg)
    chunks = registry.build(cfg, ParallelLayout(), BuildOptions(dtype=dtype, perform_initialization=False))
    if weights == "checkpoint":
        load_checkpoint(chunks, ckpt)
    else:
        _copy_weights(chunks[0], cfg, dict(hf_model.named_parameters()))
    return chunks


def build_engine(chunks, cfg: TanukiConfig, batch: int, max_len: int, kv_memory_gb: float | None, log=print):
    """An Engine holding ``batch`` requests of ``max_len`` tokens (KV sized for them unless given)."""
    from megatron_tanuki.inference.engine import Engine, EngineOptions, kv_bytes_per_token

    if kv_memory_gb is None:
        blocks = batch * -(-max_len // 256) + 8
        kv_memory_gb = blocks * 256 * kv_bytes_per_token(chunks[0]) / 1024 ** 3
    options = EngineOptions(max_sequence_length=max_len, kv_memory_gb=kv_memory_gb, max_requests=batch,
                            max_tokens=max(8192, -(-batch * 128 // 64) * 64))
    return Engine(chunks, TokenIds(cfg.vocab_size), options, vocab_limit=cfg.vocab_size, log=log)


def engine_generate(engine, work: Workload, batch: int | None) -> tuple[dict, list[list[int]]]:
    """Continuous batching (``batch`` None) or static batches of ``batch``; (measurements, tokens)."""
    from megatron_tanuki.inference.engine import SamplingOptions

    def requests(idx):
        return [(str(i), work.prompts[i], SamplingOptions(max_tokens=work.lengths[i], temperature=0.0), None)
                for i in idx]

    everything = range(len(work.prompts))
    groups = [everything] if batch is None else [everything[i:i + batch] for i in range(0, len(everything), batch)]
    outputs: dict[int, list[int]] = {}
    steps0 = engine.steps
    _sync()
    t0 = time.perf_counter()
    for group in groups:
        for c in engine.run(requests(group)):
            if c.error is not None:
                raise RuntimeError(f"request {c.key}: {c.error}")
            outputs[int(c.key)] = c.tokens
    _sync()
    seconds = time.perf_counter() - t0
    tokens = sum(len(t) for t in outputs.values())
    return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": _rate(tokens, seconds),
            "steps": engine.steps - steps0}, [outputs[i] for i in everything]


# ------------------------------------------------------------------------------ the run

def run(shape: str | None = None, workloads=("mixed", "uniform"), requests: int | None = None, batch: int | None = None,
        prompt_len: int = 128, out_min: int = 16, out_max: int = 256, seed: int = 0, weights: str | None = None,
        kv_memory_gb: float | None = None, threads: int | None = None, log=print) -> dict:
    shape = shape or default_shape()
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: expected one of {sorted(SHAPES)}")
    s = SHAPES[shape]
    cfg, batch, weights = s.model, batch or s.batch, weights or s.weights
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if (threads or s.threads) and device == "cpu":
        torch.set_num_threads(threads or s.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[s.dtype]
    if s.dtype == "fp32" and device == "cuda":  # fp32 means fp32 on both sides: no TF32 GEMMs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    works = [make_workload(w, batch if w == "uniform" else (requests or s.requests), prompt_len, out_min, out_max,
                           cfg.vocab_size, seed) for w in workloads]
    result = {"shape": shape, "model": {k: getattr(cfg, k) for k in (
                  "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                  "vocab_size")},
              "dtype": s.dtype, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch_threads": torch.get_num_threads(), "batch": batch, "prompt_len": prompt_len,
              "weights": weights, "workloads": {}}

    log(f"[bench] building transformers Llama {cfg.hidden_size}x{cfg.num_layers} ({s.dtype}) on {device}")
    hf = build_hf(cfg, dtype, device, seed)
    result["params_B"] = round(sum(p.numel() for p in hf.parameters()) / 1e9, 4)
    hf_out = {}
    for w in works:
        log(f"[bench] transformers generate: {w.name}, {len(w.prompts)} requests, {w.tokens} tokens")
        hf_out[w.name] = hf_generate(hf, w, batch, device)

    with tempfile.TemporaryDirectory(prefix="bench_generate_") as folder:
        log(f"[bench] megatron-core model from the same weights ({weights})")
        chunks = megatron_model(cfg, s.dtype, hf, weights, folder)
    del hf
    if device == "cuda":
        torch.cuda.empty_cache()
    engine = build_engine(chunks, cfg, batch, prompt_len + out_max, kv_memory_gb, log=log)
    result["attention_backend"] = engine.backend
    try:
        engine_generate(engine, Workload("warm-up", [works[0].prompts[0]] * 2, [4, 4]), None)
        for w in works:
            result["workloads"][w.name] = _engine_side(engine, w, batch, *hf_out[w.name], log)
    finally:
        engine.close()
    return result


def _engine_side(engine, w: Workload, batch: int, hf_stats: dict, hf_tokens: list, log) -> dict:
    """The engine on workload ``w`` (continuous, and static for mixed lengths) beside HF's figures."""
    log(f"[bench] engine, continuous batching: {w.name}")
    cb, cb_tokens = engine_generate(engine, w, None)
    entry = {"requests": len(w.prompts), "out_min": min(w.lengths), "out_max": max(w.lengths),
             "expected_tokens": w.tokens, "hf": hf_stats, "engine": cb}
    if w.name == "mixed":  # with equal lengths and one batch, static and continuous are the same run
        log(f"[bench] engine, static batches of {batch}: {w.name}")
        st, st_tokens = engine_generate(engine, w, batch)
        entry["engine_static"] = st
        entry["engine_vs_static"] = round(cb["tokens_per_s"] / max(st["tokens_per_s"], 1e-9), 2)
        entry["static_same_as_engine"] = sum(a == b for a, b in zip(st_tokens, cb_tokens))
    entry["engine_vs_hf"] = round(cb["tokens_per_s"] / max(hf_stats["tokens_per_s"], 1e-9), 2)
    entry["same_as_hf"] = sum(a == b for a, b in zip(cb_tokens, hf_tokens))
    return entry


def format_result(r: dict) -> str:
    m = r["model"]
    lines = [f"shape {r['shape']}: hidden {m['hidden_size']}, {m['num_layers']} layers, "
             f"{m['num_attention_heads']}/{m['num_query_groups']} heads, FFN {m['ffn_hidden_size']}, vocab "
             f"{m['vocab_size']} ({r['params_B']} B params), {r['dtype']} on {r['device']} "
             f"({r['torch_threads']} torch threads), attention {r['attention_backend']}, weights via {r['weights']}",
             f"batch {r['batch']} in flight, prompts of {r['prompt_len']} tokens"]
    for name, w in r["workloads"].items():
        lines.append(f"workload {name}: {w['requests']} requests, output {w['out_min']}..{w['out_max']} tokens, "
                     f"{w['expected_tokens']} tokens in all")
        for key, label in (("hf", "transformers generate"), ("engine", "engine (continuous batching)"),
                           ("engine_static", "engine (static batches)")):
            if key not in w:
                continue
            x = w[key]
            extra = (f", {x['steps']} steps" if "steps" in x else
                     f", {x['batches']} batches, {x['generated_tokens']} tokens generated")
            lines.append(f"  {label:30s} {x['tokens_per_s']:10.1f} tok/s  {x['tokens']} tokens in "
                         f"{x['seconds']:.2f} s{extra}")
        lines.append(f"  engine / transformers: {w['engine_vs_hf']}x; same greedy tokens as transformers: "
                     f"{w['same_as_hf']}/{w['requests']} requests")
        if "engine_static" in w:
            lines.append(f"  continuous / static batching: {w['engine_vs_static']}x "
                         f"({w['engine']['steps']} vs {w['engine_static']['steps']} steps); same tokens: "
                         f"{w['static_same_as_engine']}/{w['requests']}")
    return "\n".join(lines)


def write_json(r: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(r, f, indent=2)
        f.write("\n")
