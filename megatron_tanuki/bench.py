"""Training-step benchmark of a Tanuki transformer block (what `tools/bench_train_step.py` runs).

Builds ``--layers`` layers of a preset's shape with the same layer spec the models use (SDPA core
attention, Tanuki RMSNorm and router on the non-TE path; TE spec when available), times
forward + backward after warm-up, and prints tokens/s, model TFLOPS and peak memory.
Model FLOPs come from ``models/flops.py`` (re-exported here), the accounting training reports:
3 x forward matmul FLOPs, causal attention counted as half, so the numbers compare with the H100
baselines in ../shared/probes (HF Mixtral layers 363, mcore+SDPA 386).
It measures; it asserts nothing about speed.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from megatron_tanuki.models.flops import (  # noqa: F401 (re-exported: the benchmark's accounting)
    model_flops_per_step, projector_flops, vision_flops)


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
    peak_mem_gib: float  # GPU: torch peak allocated; CPU: process peak RSS
    spec: str


def _seconds_per_step(step, warmup: int, iters: int, on_gpu: bool) -> float:
    """Mean wall time of ``step`` after ``warmup`` calls; GPU peak-memory stats restart here."""
    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return (time.perf_counter() - t0) / iters


def _peak_memory_bytes(on_gpu: bool) -> int:
    """GPU: peak allocated by torch during the timed steps. CPU: the process's peak RSS."""
    if on_gpu:
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(preset: str = "tanuki-8x8b-tiny", layers: int = 2, seq: int = 128, batch: int = 1,
        dtype: str = "auto", warmup: int = 2, iters: int = 5) -> BenchResult:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    from megatron_tanuki.models import registry, specs
    from megatron_tanuki.models.tanuki.builder import BuildOptions, transformer_config
    from megatron_tanuki.models.tanuki.router import TanukiRouter
    from megatron_tanuki.runtime import cpu
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_single_process

    cfg = registry.get_preset(preset).replace(num_layers=layers)
    on_gpu = cpu.gpu_present()
    if dtype == "auto":
        dtype = "bf16" if on_gpu else "fp32"
    init_single_process(ParallelLayout(), cfg)
    device = torch.device("cuda") if on_gpu else torch.device("cpu")
    opts = BuildOptions(dtype=dtype)
    use_te = specs.te_available()
    tcfg = transformer_config(cfg, ParallelLayout(), opts, use_te)
    layer = specs.gpt_layer_spec(cfg.num_experts, TanukiRouter, use_te=use_te)
    block = TransformerBlock(tcfg, TransformerBlockSubmodules(
        layer_specs=[layer] * layers, layer_norm=specs.final_norm(use_te))).to(device)
    rope = RotaryEmbedding(cfg.head_dim, rotary_percent=1.0, rotary_base=cfg.rope_theta)(seq).to(device)
    x = torch.randn(seq, batch, cfg.hidden_size, device=device, dtype=opts.torch_dtype(),
                    requires_grad=True)

    def step():
        y = block(x, attention_mask=None, rotary_pos_emb=rope)
        y.float().pow(2).mean().backward()

    step_s = _seconds_per_step(step, warmup, iters, on_gpu)
    flops = model_flops_per_step(cfg, layers, seq, batch)
    return BenchResult(
        preset=preset, device=torch.cuda.get_device_name() if on_gpu else "cpu", dtype=dtype,
        layers=layers, seq=seq, batch=batch, step_s=round(step_s, 5),
        tokens_per_s=round(seq * batch / step_s, 1), model_tflops=round(flops / step_s / 1e12, 3),
        peak_mem_gib=round(_peak_memory_bytes(on_gpu) / 2**30, 2),
        spec="transformer-engine" if use_te else "local+sdpa")


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


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="default: tanuki-8x8b on a GPU, tanuki-8x8b-tiny on CPU")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=None, help="default: 4096 on a GPU, 128 on CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
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
    r = run(preset=a.preset or ("tanuki-8x8b" if gpu else "tanuki-8x8b-tiny"), layers=a.layers,
            seq=a.seq or (4096 if gpu else 128), batch=a.batch, dtype=a.dtype, warmup=a.warmup,
            iters=a.iters)
    if a.json:
        print(json.dumps(r.__dict__))
    else:
        mem = f"{r.peak_mem_gib} GiB" + ("" if gpu else " (process RSS)")
        print(f"{r.preset} x{r.layers} layers, seq {r.seq}, batch {r.batch}, {r.dtype}, {r.spec} on {r.device}: "
              f"step {r.step_s * 1e3:.1f} ms, {r.tokens_per_s:,.0f} tokens/s, "
              f"{r.model_tflops} model TFLOPS, peak memory {mem}")
    return 0
