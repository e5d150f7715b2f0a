"""Architectures and presets: one record per architecture, the only place that dispatches on it.

Each :class:`Architecture` says everything that differs between Tanuki and Tanuki-vision (and a
later Nemotron-4): how to build it, which language model the parallel layout is checked against,
its HF name table, its HF config.json in both directions, the tensors carried unused, and its
FLOPs -- as torchtitan's ``ModelSpec`` and Megatron-Bridge's bridges do. Callers ask
``architecture_of(cfg)`` instead of testing config types, so adding an architecture is one folder
and one line in ``ARCHITECTURES``. ``tanuki model-info`` reads presets from here too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from megatron_tanuki.models.tanuki import config as tanuki_config
from megatron_tanuki.models.tanuki_vision import presets as vision_presets
from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig


@dataclass(frozen=True)
class Architecture:
    name: str
    config_type: type
    presets: dict
    build: Callable[..., list]  # (cfg, layout, opts=None, device=None) -> model chunks of this rank
    language_model: Callable[[Any], Any]  # cfg -> the TanukiConfig the layout is validated against
    with_language_model: Callable[[Any, Any], Any]  # (cfg, new llm cfg) -> cfg (overrides, verify --layers)
    hf_rules: Callable[[Any, int], Any]  # (cfg, hf_vocab) -> iterable of (Rule, Shape), streaming order
    hf_config_out: Callable[[Any, int], dict]  # (cfg, hf_vocab) -> config.json when none was carried
    is_carried: Callable[[str, Any], bool]  # HF tensors kept in carried/ (never computed)
    flops_per_row: Callable[[Any, int, int], float]  # (cfg, seq, images) -> training FLOPs of one row
    modes: tuple[str, ...]  # training modes it supports (train.mode)
    set_mode: Callable[[list, str], None]  # which parts train in a mode (VLM stage 1: projector only)


def _tanuki_build(cfg, layout, opts=None, device=None):
    from megatron_tanuki.models.tanuki.builder import build_model

    return build_model(cfg, layout, opts, device=device)


def _vision_build(cfg, layout, opts=None, device=None):
    from megatron_tanuki.models.tanuki_vision.builder import build_vlm

    return build_vlm(cfg, layout, opts, device=device)


def _tanuki_rules(cfg, hf_vocab: int):
    from megatron_tanuki.models.shapes import Shape
    from megatron_tanuki.models.tanuki import hf_map

    shape = Shape(cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim, hf_vocab, cfg.vocab_size)
    return ((rule, shape) for rule in hf_map.rules(cfg.num_layers, cfg.num_experts))


def _vision_rules(cfg, hf_vocab: int):
    from megatron_tanuki.models.tanuki_vision import hf_map

    return hf_map.rules(cfg, hf_vocab)


def _tanuki_hf_config(cfg, hf_vocab: int) -> dict:
    from megatron_tanuki.models.tanuki.hf_config import to_hf_config

    return to_hf_config(cfg, hf_vocab)


def _vision_hf_config(cfg, hf_vocab: int) -> dict:
    from megatron_tanuki.models.tanuki_vision.hf_config import to_llava_jp_config

    return to_llava_jp_config(cfg, hf_vocab)


def _vision_carried(name: str, cfg) -> bool:
    from megatron_tanuki.models.tanuki_vision import hf_map

    return hf_map.is_carried(name, cfg)


def _vision_set_mode(chunks, mode: str) -> None:
    for c in chunks:  # the tower is always frozen; stage 1 trains the projector only
        c.set_trainable(projector=True, language_model=mode != "vlm_stage1")


def _flops(cfg, seq: int, images: int = 0) -> float:
    from megatron_tanuki.models.flops import flops_per_row

    return flops_per_row(cfg, seq, images)


TANUKI = Architecture(
    name="tanuki", config_type=tanuki_config.TanukiConfig, presets=tanuki_config.PRESETS,
    build=_tanuki_build, language_model=lambda cfg: cfg, with_language_model=lambda cfg, llm: llm,
    hf_rules=_tanuki_rules, hf_config_out=_tanuki_hf_config, is_carried=lambda name, cfg: False,
    flops_per_row=_flops, modes=("pretrain", "sft"), set_mode=lambda chunks, mode: None)
TANUKI_VISION = Architecture(
    name="tanuki-vision", config_type=TanukiVisionConfig, presets=vision_presets.PRESETS,
    build=_vision_build, language_model=lambda cfg: cfg.llm,
    with_language_model=lambda cfg, llm: cfg.replace(llm=llm),
    hf_rules=_vision_rules, hf_config_out=_vision_hf_config, is_carried=_vision_carried,
    flops_per_row=_flops, modes=("vlm_stage1", "vlm_stage2"), set_mode=_vision_set_mode)
ARCHITECTURES = (TANUKI, TANUKI_VISION)

PRESETS = {name: cfg for arch in ARCHITECTURES for name, cfg in arch.presets.items()}


def architecture_of(cfg) -> Architecture:
    """The record for a config object (a preset, or one read from tanuki.json / config.json)."""
    for arch in ARCHITECTURES:
        if isinstance(cfg, arch.config_type):
            return arch
    raise TypeError(f"no architecture is registered for {type(cfg).__name__}")


def language_model(cfg):
    return architecture_of(cfg).language_model(cfg)


def with_overrides(cfg, overrides: dict, source: str = "model.overrides"):
    """``cfg`` with language-model fields replaced; an unknown field is a named ValueError."""
    if not overrides:
        return cfg
    arch = architecture_of(cfg)
    llm = arch.language_model(cfg)
    known = [f.name for f in dataclasses.fields(llm) if f.name != "name"]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {unknown} for {cfg.name}; known: {', '.join(known)}")
    return arch.with_language_model(cfg, llm.replace(**overrides))


def build(cfg, layout, opts=None, device=None) -> list:
    return architecture_of(cfg).build(cfg, layout, opts, device=device)


def get_preset(name: str):
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def model_info(name: str) -> dict:
    """Parameter counts of the whole model, built on the meta device (no memory, one process)."""
    from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model, count_parameters
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_single_process

    preset = get_preset(name)
    vision = preset if architecture_of(preset) is TANUKI_VISION else None
    cfg = language_model(preset)
    init_single_process(ParallelLayout(), cfg)
    chunks = build_model(cfg, ParallelLayout(), BuildOptions(perform_initialization=False), device="meta")
    counts = count_parameters(chunks, cfg)
    info = {
        "preset": name,
        "architecture": "moe" if cfg.is_moe else "dense",
        "parameters": {"total": counts["total"], "active": counts["active"],
                       "experts": counts["experts"], "non_expert": counts["non_expert"]},
        "config": cfg.to_dict(),
    }
    if vision:
        from megatron_tanuki.models.tanuki_vision.model import projector_parameter_count

        parts = {"vision": vision.vision.parameter_count(), "projector": projector_parameter_count(vision),
                 "language": counts["total"]}
        info["architecture"] = f"vision+{info['architecture']}"
        info["parts"] = parts
        info["parameters"] = {**info["parameters"], "total": sum(parts.values()),
                              "active": counts["active"] + parts["vision"] + parts["projector"]}
    return info


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_model_info(info: dict) -> str:
    c, p = info["config"], info["parameters"]
    lines = [
        f"{info['preset']} ({info['architecture']})",
        f"  layers {c['num_layers']}, hidden {c['hidden_size']}, heads {c['num_attention_heads']}"
        f" / KV {c['num_query_groups']}, FFN {c['ffn_hidden_size']}, vocab {c['vocab_size']},"
        f" rope theta {c['rope_theta']:g}, max positions {c['max_position_embeddings']}",
    ]
    if c["num_experts"]:
        lines.append(f"  experts {c['num_experts']}, top-{c['moe_topk']}, standardized router,"
                     f" aux-loss coeff {c['moe_aux_loss_coeff']}")
    if "parts" in info:
        lines.append("  parts: " + ", ".join(f"{k} {v:,} ({_human(v)})" for k, v in info["parts"].items()))
    lines.append(f"  parameters: total {p['total']:,} ({_human(p['total'])}),"
                 f" active per token {p['active']:,} ({_human(p['active'])})")
    return "\n".join(lines)
