"""Training-step benchmark of a Tanuki transformer block (what `tools/bench_train_step.py` runs).

Builds ``--layers`` layers of a preset's shape with the layer spec the models use and times
forward + backward after warm-up: tokens/s, model TFLOPS, peak memory. For an MoE preset the expert
paths run side by side (``--experts``, default ``both``), each on a fresh block from the same seed and
input, so the lines differ only in the experts:

* ``grouped``: local spec (SDPA core attention, Tanuki RMSNorm and router) with GroupedGemmMLP
  (common/grouped_experts.py: two ``torch._grouped_mm`` per layer);
* ``sequential``: the same local spec with megatron-core's SequentialMLP (one GEMM per expert);
* ``te``: Transformer Engine's spec and grouped MLP, where TE can run (``specs.te_available()``).

Then the ratio of the grouped to the sequential step time. Each line says whether the grouped kernel
really ran: GroupedGemmMLP falls back to SequentialMLP's forward where ``torch._grouped_mm`` cannot
run (on CUDA anything but bf16; sizes not 16-byte aligned), and a "grouped" number that timed the
fallback would mislead. ``--experts sequential`` (or ``grouped``, ``te``) runs one path; a dense preset
runs the one path its models use (TE spec when available, else local).

The data side of a pretraining step (``--data-wait``, on by default, not with ``--vlm``): a small
megatron-core indexed dataset (random Japanese-ish text, the real Tanuki tokenizer, written by
`tanuki preprocess-data`'s builder) read by GPTDataset through BlendedMegatronDatasetBuilder; it
reports the seconds to build one global batch of ``--batch`` rows synchronously, and the seconds the
step waited per step when data/prefetch.py builds the batches (depth 2) while the step runs --
~0 when prefetching hides the data path, as it should.

Model FLOPs come from ``models/flops.py`` (re-exported here), the accounting training reports:
3 x forward matmul FLOPs, causal attention counted as half, so the numbers compare with the H100
baselines in ../shared/probes (HF Mixtral layers 363, mcore+SDPA 386; the grouped-GEMM goal without
TE is 1.5x the HF number).
It measures; it asserts nothing about speed.
"""
from __future__ import annotations

import gc
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch

from megatron_tanuki.models.flops import (  # noqa: F401 (re-exported: the benchmark's accounting)
    model_flops_per_step, projector_flops, vision_flops)

EXPERT_PATHS = ("te", "grouped", "sequential")  # print order
PREFETCH_DEPTH = 2


@dataclass
class BenchResult:
    preset: str
    device: str
    dtype: str
    layers: int
    seq: int
    batch: int
    step_s: float
    tokens_per_s: float
    model_tflops: float
    peak_mem_gib: float  # GPU: torch peak allocated; CPU: process peak RSS (so far, all paths)
    spec: str
    path: str = "default"  # te | grouped | sequential | dense
    experts: str | None = None  # the expert module's class (None: dense)
    # GroupedGemmMLP took torch._grouped_mm in every forward seen (False: its SequentialMLP
    # fallback ran); None where no GroupedGemmMLP is in the block
    grouped_kernel: bool | None = None
    tokens: int = 0  # tokens per step (seq x batch)
    # sum of the first step's block output: one seed, one input, so every expert path should give
    # the same number (fp32; bf16 and TE to rounding) -- a path that computes something else shows here
    output_sum: float | None = None
    data: dict | None = None  # the data-wait numbers, on the path that measured them


def _sync(on_gpu: bool) -> None:
    if on_gpu:
        torch.cuda.synchronize()


def _seconds_per_step(step, warmup: int, iters: int, on_gpu: bool) -> float:
    """Mean wall time of ``step`` after ``warmup`` calls; GPU peak-memory stats restart here."""
    for _ in range(warmup):
        step()
    _sync(on_gpu)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(on_gpu)
    return (time.perf_counter() - t0) / iters


def _peak_memory_bytes(on_gpu: bool) -> int:
    """GPU: peak allocated by torch during the timed steps. CPU: the process's peak RSS."""
    if on_gpu:
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def default_path(num_experts: int | None) -> str:
    """The path a model built on this host takes (BuildOptions' defaults)."""
    from megatron_tanuki.models import specs

    if specs.te_available():
        return "te"
    if not num_experts:
        return "dense"
    return "grouped" if specs.grouped_gemm_default(False) else "sequential"


def expert_paths(choice: str | None, num_experts: int | None) -> list[str]:
    """``--experts`` -> the paths to run, in print order. None: ``both`` for MoE, else the default."""
    from megatron_tanuki.models import specs

    if choice is None:
        choice = "both" if num_experts else "default"
    if choice == "default":
        return [default_path(num_experts)]
    if choice == "te" and not specs.te_available():
        raise ValueError("--experts te: Transformer Engine cannot run here (not importable, no GPU, or TANUKI_TE=0)")
    if not num_experts:
        if choice == "te":
            return ["te"]
        raise ValueError(f"--experts {choice}: the preset is dense (no experts); leave --experts out")
    if choice == "both":
        return [p for p in EXPERT_PATHS if p != "te" or specs.te_available()]
    if choice not in EXPERT_PATHS:
        raise ValueError(f"--experts {choice!r}: expected one of grouped, sequential, te, both")
    return [choice]


def _watch_grouped(block) -> list[bool]:
    """Record, per GroupedGemmMLP forward, whether it took the grouped kernel (the module's
    ``last_forward_grouped``, set by each forward)."""
    from megatron_tanuki.models.common.grouped_experts import GroupedGemmMLP

    seen: list[bool] = []
    for m in block.modules():
        if isinstance(m, GroupedGemmMLP):
            m.register_forward_hook(lambda mod, args, out: seen.append(bool(mod.last_forward_grouped)))
    return seen


def run(preset: str = "tanuki-8x8b-tiny", layers: int = 2, seq: int = 128, batch: int = 1,
        dtype: str = "auto", warmup: int = 2, iters: int = 5, path: str | None = None,
        seed: int = 1234, data: "DataWait | None" = None) -> BenchResult:
    """Time one path (``path``: te | grouped | sequential | dense; None: what models use here).
    ``data``: also run ``iters`` steps fed by the prefetcher and put its numbers in ``.data``."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    from megatron_tanuki.models import registry, specs
    from megatron_tanuki.models.tanuki.builder import BuildOptions, grouped_gemm, transformer_config
    from megatron_tanuki.models.tanuki.router import TanukiRouter
    from megatron_tanuki.runtime import cpu
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_single_process, set_seeds

    cfg = registry.get_preset(preset).replace(num_layers=layers)
    path = path or default_path(cfg.num_experts)
    on_gpu = cpu.gpu_present()
    if dtype == "auto":
        dtype = "bf16" if on_gpu else "fp32"
    init_single_process(ParallelLayout(), cfg)
    set_seeds(seed)  # every path: the same weights, input and routing
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    use_te = path == "te"
    opts = BuildOptions(dtype=dtype, use_te=use_te,
                        moe_grouped_gemm={"grouped": True, "sequential": False}.get(path))
    tcfg = transformer_config(cfg, ParallelLayout(), opts, use_te)
    layer = specs.gpt_layer_spec(cfg.num_experts, TanukiRouter, use_te=use_te,
                                 grouped_gemm=grouped_gemm(opts, use_te))
    block = TransformerBlock(tcfg, TransformerBlockSubmodules(
        layer_specs=[layer] * layers, layer_norm=specs.final_norm(use_te))).to(device)
    rope = RotaryEmbedding(cfg.head_dim, rotary_percent=1.0, rotary_base=cfg.rope_theta)(seq).to(device)
    x = torch.randn(seq, batch, cfg.hidden_size, device=device, dtype=opts.torch_dtype(),
                    requires_grad=True)
    grouped_seen = _watch_grouped(block)
    experts = next((type(m.experts).__name__ for m in block.modules() if isinstance(m, MoELayer)), None)
    first = []

    def step():
        y = block(x, attention_mask=None, rotary_pos_emb=rope)
        y.float().pow(2).mean().backward()
        if not first:
            first.append(y.detach().double().sum().item())

    step()  # the first step: its output, and a warm-up step
    step_s = _seconds_per_step(step, max(warmup - 1, 0), iters, on_gpu)
    flops = model_flops_per_step(cfg, layers, seq, batch)
    r = BenchResult(
        preset=preset, device=torch.cuda.get_device_name() if on_gpu else "cpu", dtype=dtype,
        layers=layers, seq=seq, batch=batch, step_s=round(step_s, 5),
        tokens_per_s=round(seq * batch / step_s, 1), model_tflops=round(flops / step_s / 1e12, 3),
        peak_mem_gib=round(_peak_memory_bytes(on_gpu) / 2**30, 2),
        spec="transformer-engine" if use_te else "local+sdpa", path=path,
        experts=experts, grouped_kernel=all(grouped_seen) if grouped_seen else None, tokens=seq * batch,
        output_sum=first[0])
    if data is not None:
        r.data = data.measure(step, device, warmup, iters, on_gpu)
    return r


def compare(preset: str = "tanuki-8x8b-tiny", layers: int = 2, seq: int = 128, batch: int = 1,
            dtype: str = "auto", warmup: int = 2, iters: int = 5, experts: str | None = None,
            data_wait: bool = True, seed: int = 1234) -> dict:
    """Every path of ``experts`` (see expert_paths) on a fresh block; the data wait on the path
    models use here (else the last one run). JSON-ready: paths, ratios, data."""
    from megatron_tanuki.models import registry

    paths = expert_paths(experts, registry.get_preset(preset).num_experts)
    data_on = default_path(registry.get_preset(preset).num_experts)
    data_on = data_on if data_on in paths else paths[-1]
    results, data = {}, None
    with tempfile.TemporaryDirectory(prefix="tanuki-bench-data-") as folder:
        source = DataWait(folder, seq, batch, warmup + iters, seed) if data_wait else None
        for p in paths:
            r = run(preset, layers, seq, batch, dtype, warmup, iters, path=p, seed=seed,
                    data=source if p == data_on else None)
            results[p] = dict(r.__dict__)
            data = results[p].pop("data") or data
            gc.collect()  # this path's block is gone before the next one's peak memory is measured
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    out = {"paths": results, "data": data}
    if "grouped" in results and "sequential" in results:
        out["grouped_vs_sequential"] = round(results["sequential"]["step_s"] / results["grouped"]["step_s"], 3)
    if "te" in results and "sequential" in results:
        out["te_vs_sequential"] = round(results["sequential"]["step_s"] / results["te"]["step_s"], 3)
    return out


# --- the data side of a step ---------------------------------------------------------------------

def japanese_documents(n: int, seed: int = 0) -> list[str]:
    """``n`` documents of random Japanese-ish text: words of hiragana, katakana or kanji, 。and 、."""
    rng = random.Random(seed)
    scripts = ([chr(c) for c in range(0x3041, 0x3094)], [chr(c) for c in range(0x30A1, 0x30FB)],
               list("日本語学習自然言語処理大規模計算機械時間今年世界人間社会経済文化研究開発東京大学生活情報"))
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(2, 12)):
            words = ["".join(rng.choices(rng.choice(scripts), k=rng.randint(1, 4)))
                     for _ in range(rng.randint(4, 16))]
            sentences.append("".join(w + ("、" if rng.random() < 0.1 else "") for w in words) + "。")
        docs.append("".join(sentences))
    return docs


def global_batches(dataset, batch: int):
    """Endless global batches: ``batch`` consecutive samples, each key stacked (one DP rank's loader)."""
    i = 0
    while True:
        rows = [dataset[(i + r) % len(dataset)] for r in range(batch)]
        i += batch
        yield {k: torch.stack([row[k] for row in rows]) for k in rows[0]}


class DataWait:
    """A tiny GPTDataset in ``folder`` and the two data-side numbers of a pretraining step."""

    def __init__(self, folder: str, seq: int, batch: int, steps: int, seed: int = 1234, build_batches: int = 5):

        from megatron_tanuki.data import blend
        from megatron_tanuki.data.indexed import preprocess
        from megatron_tanuki.data.tokenizer import load_tokenizer

        self.batch, self.build_batches = batch, build_batches
        samples = batch * (steps + build_batches + PREFETCH_DEPTH + 2)
        # ~120 tokens a document: enough for every sample within an epoch or two
        n_docs = min(max(64, samples * (seq + 1) // 120), 4096)
        src = os.path.join(folder, "docs.jsonl")
        with open(src, "w", encoding="utf-8") as f:
            for text in japanese_documents(n_docs, seed):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        self.corpus = preprocess([src], os.path.join(folder, "bench"), progress=False,
                                 log=lambda *a, **k: None)
        # the same dataset configuration training uses (data/blend.py), one dataset, all of it for training
        config = blend.gpt_config(load_tokenizer(), seed, seq, ([self.corpus["prefix"]], None), None, "100,0,0",
                                  os.path.join(folder, "cache"))
        self.dataset = blend.build(config, [samples, 0, 0])[0]

    def build_seconds(self) -> float:
        """Mean seconds to build one global batch on the caller's thread (after one warm-up batch)."""
        batches = global_batches(self.dataset, self.batch)
        self.batch_shape = list(next(batches)["tokens"].shape)
        t0 = time.perf_counter()
        for _ in range(self.build_batches):
            next(batches)
        return (time.perf_counter() - t0) / self.build_batches

    def measure(self, step, device: torch.device, warmup: int, iters: int, on_gpu: bool) -> dict:
        """Build time, then ``warmup`` + ``iters`` steps each taking its batch from a Prefetcher."""
        from megatron_tanuki.data.prefetch import Prefetcher

        build_s = self.build_seconds()
        pf = Prefetcher(global_batches(self.dataset, self.batch), depth=PREFETCH_DEPTH)
        try:
            def fed_step():
                tokens = pf.next()["tokens"].to(device, non_blocking=True)  # what the embedding would read
                step()
                return tokens

            for _ in range(warmup):
                fed_step()
            _sync(on_gpu)
            pf.take_wait()
            t0 = time.perf_counter()
            for _ in range(iters):
                fed_step()
            _sync(on_gpu)
            fed_s = (time.perf_counter() - t0) / iters
            wait_s = pf.take_wait() / iters
        finally:
            pf.close()
        return {"build_s_per_batch": round(build_s, 6), "wait_s_per_step": round(wait_s, 6),
                "prefetch_depth": PREFETCH_DEPTH, "step_s_with_prefetch": round(fed_s, 5),
                "batch_shape": self.batch_shape, "samples": len(self.dataset),
                "documents": self.corpus["documents"], "corpus_tokens": self.corpus["tokens"]}


def vlm_config(preset: str, on_gpu: bool):
    """A Tanuki-vision preset as it is, or an LLM preset with SigLIP-so400m (GPU) / the tiny tower (CPU)."""
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig
    from megatron_tanuki.models.vision import siglip

    p = registry.get_preset(preset)
    if registry.architecture_of(p) is registry.TANUKI_VISION:
        return p
    return TanukiVisionConfig(f"{preset}-vision", p, siglip.SIGLIP_SO400M if on_gpu else siglip.SIGLIP_TINY)


def run_vlm(preset: str = "tanuki-vision-8x8b", layers: int = 2, text_tokens: int = 296, batch: int = 1,
            dtype: str = "auto", warmup: int = 2, iters: int = 5) -> dict:
    """One step of a Tanuki-vision block: the tower with S2 as the config's geometry says (frozen,
    forward only), mlp2x_gelu projector, ``layers`` language layers (forward + backward)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    from megatron_tanuki.models import specs
    from megatron_tanuki.models.tanuki.builder import BuildOptions, transformer_config
    from megatron_tanuki.models.tanuki.router import TanukiRouter
    from megatron_tanuki.models.vision import siglip
    from megatron_tanuki.models.vision.projector import build_projector
    from megatron_tanuki.models.vision.s2 import s2_features
    from megatron_tanuki.runtime import cpu
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_single_process

    on_gpu = cpu.gpu_present()
    dtype = ("bf16" if on_gpu else "fp32") if dtype == "auto" else dtype
    vlm = vlm_config(preset, on_gpu)
    cfg, vcfg, geom = vlm.llm.replace(num_layers=layers), vlm.vision, vlm.s2
    init_single_process(ParallelLayout(), cfg)
    dev = torch.device("cuda") if on_gpu else torch.device("cpu")
    opts = BuildOptions(dtype=dtype)
    tdtype = opts.torch_dtype()
    use_te = specs.te_available()
    block = TransformerBlock(transformer_config(cfg, ParallelLayout(), opts, use_te), TransformerBlockSubmodules(
        layer_specs=[specs.gpt_layer_spec(cfg.num_experts, TanukiRouter, use_te=use_te)] * layers,
        layer_norm=specs.final_norm(use_te))).to(dev)
    tower = siglip.SiglipTower(vcfg, siglip.transformer_config(vcfg, ParallelLayout(), tdtype)).to(dev)
    tower.requires_grad_(False)
    proj = build_projector(vlm.projector_input_size, cfg.hidden_size, ParallelLayout(), tdtype).to(dev)
    n_img = vlm.num_image_tokens
    seq = n_img + text_tokens
    rope = RotaryEmbedding(cfg.head_dim, rotary_percent=1.0, rotary_base=cfg.rope_theta)(seq).to(dev)
    images = torch.randn(batch, 3, geom.input_size, geom.input_size, device=dev, dtype=tdtype)
    text = torch.randn(text_tokens, batch, cfg.hidden_size, device=dev, dtype=tdtype)

    def step():
        with torch.no_grad():
            feats = s2_features(tower, images, geom)
        img = proj(feats).transpose(0, 1)  # [image tokens, b, h]
        x = torch.cat([img, text], dim=0)
        y = block(x, attention_mask=None, rotary_pos_emb=rope)
        y.float().pow(2).mean().backward()

    step_s = _seconds_per_step(step, warmup, iters, on_gpu)
    llm = model_flops_per_step(cfg, layers, seq, batch)
    projector = projector_flops(vlm) * batch
    vision = vision_flops(vcfg, geom.tower_runs) * batch
    total = llm + projector + vision
    return {"preset": preset, "vision": vcfg.name, "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "dtype": dtype, "layers": layers, "seq": seq, "image_tokens": n_img, "batch": batch,
            "image_size": geom.input_size, "s2_scales": list(geom.scales), "tower_runs": geom.tower_runs,
            "step_s": round(step_s, 5), "samples_per_s": round(batch / step_s, 2),
            "model_tflops": round(total / step_s / 1e12, 3),
            "flops_share": {"vision": round(vision / total, 3), "projector": round(projector / total, 3),
                            "llm": round(llm / total, 3)},
            "peak_mem_gib": round(_peak_memory_bytes(on_gpu) / 2**30, 2)}


def _path_line(r: dict, gpu: bool) -> str:
    experts = ""
    if r["experts"]:
        kernel = {True: ", grouped kernel ran", False: ", grouped kernel did NOT run (SequentialMLP fallback)",
                  None: ""}[r["grouped_kernel"]]
        experts = f" [{r['experts']}{kernel}]"
    mem = f"{r['peak_mem_gib']} GiB" + ("" if gpu else " (process RSS)")
    return (f"  {r['path']:<10} {r['spec']}{experts}: step {r['step_s'] * 1e3:.1f} ms, "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['model_tflops']} model TFLOPS, peak memory {mem}, "
            f"output sum {r['output_sum']:.9g}")


def print_report(out: dict, gpu: bool) -> None:
    first = next(iter(out["paths"].values()))
    print(f"{first['preset']} x{first['layers']} layers, seq {first['seq']}, batch {first['batch']}, "
          f"{first['dtype']} on {first['device']}:")
    for r in out["paths"].values():
        print(_path_line(r, gpu))
    for other in ("grouped", "te"):
        if (ratio := out.get(f"{other}_vs_sequential")) is not None:
            a, b = out["paths"][other]["step_s"], out["paths"]["sequential"]["step_s"]
            print(f"{other} vs sequential: {ratio:.2f}x (step {a * 1e3:.1f} ms vs {b * 1e3:.1f} ms; "
                  f">1: {other} faster)")
    if (d := out["data"]) is not None:
        print(f"data: {d['build_s_per_batch'] * 1e3:.2f} ms/batch to build, {d['wait_s_per_step'] * 1e3:.2f} "
              f"ms/step waited with prefetch (depth {d['prefetch_depth']}) [batches of "
              f"{'x'.join(map(str, d['batch_shape']))} tokens from a GPTDataset of {d['documents']} documents, "
              f"{d['corpus_tokens']:,} tokens; step with prefetch {d['step_s_with_prefetch'] * 1e3:.1f} ms]")


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="default: tanuki-8x8b on a GPU, tanuki-8x8b-tiny on CPU")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=None, help="default: 4096 on a GPU, 128 on CPU")
    p.add_argument("--batch", type=int, default=1, help="rows per step (and per global batch of --data-wait)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--experts", default=None, choices=["grouped", "sequential", "te", "both"],
                   help="MoE expert path(s): grouped GEMM (ours, local spec), sequential (SequentialMLP), te "
                        "(Transformer Engine spec), both (grouped and sequential, and te where TE runs); "
                        "default: both for an MoE preset")
    p.add_argument("--data-wait", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the data side: build one global batch from a GPTDataset, and the step's "
                        "wait with the prefetcher (default: on)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--vlm", action="store_true",
                   help="Tanuki-vision step: tower + S2 + projector + --layers LLM layers (default preset "
                        "tanuki-vision-8x8b on a GPU, tanuki-vision-8x8b-tiny on CPU; an LLM preset gets "
                        "SigLIP-so400m on a GPU, the tiny tower on CPU)")
    p.add_argument("--text-tokens", type=int, default=296, help="--vlm: text tokens after the image tokens")
    a = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if a.vlm:
        r = run_vlm(preset=a.preset or ("tanuki-vision-8x8b" if gpu else "tanuki-vision-8x8b-tiny"), layers=a.layers,
                    text_tokens=a.text_tokens, batch=a.batch, dtype=a.dtype, warmup=a.warmup, iters=a.iters)
        print(json.dumps(r) if a.json else
              f"{r['preset']} + {r['vision']} (S2 {r['s2_scales']} at {r['image_size']} px, {r['tower_runs']} "
              f"tiles/image), {r['layers']} LLM layers, seq {r['seq']}, batch "
              f"{r['batch']}, {r['dtype']} on {r['device']}: step {r['step_s'] * 1e3:.1f} ms, "
              f"{r['samples_per_s']} samples/s, {r['model_tflops']} model TFLOPS, peak {r['peak_mem_gib']} GiB")
        return 0
    try:
        out = compare(preset=a.preset or ("tanuki-8x8b" if gpu else "tanuki-8x8b-tiny"), layers=a.layers,
                      seq=a.seq or (4096 if gpu else 128), batch=a.batch, dtype=a.dtype, warmup=a.warmup,
                      iters=a.iters, experts=a.experts, data_wait=a.data_wait)
    except ValueError as e:
        p.error(str(e))
    if a.json:
        print(json.dumps(out))
    else:
        print_report(out, gpu)
    return 0
