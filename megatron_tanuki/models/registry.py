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

from megatron_tanuki.models.nemotron4 import config as nemotron4_config
from megatron_tanuki.models.tanuki import config as tanuki_config
from megatron_tanuki.models.tanuki_vision import presets as vision_presets
from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig


@dataclass(frozen=True)
class RewardFormat:
    """How a reward model of the architecture reads a conversation and names its outputs."""

    template: str  # conversation template of the turns
    system: str  # system prompt when the conversation brings none
    label: str  # appended after the answer's closing newline; scored at its last token
    attributes: tuple[str, ...]  # names of the last len(attributes) outputs
    weights: tuple[float, ...]  # the reward: weighted sum of those attributes


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
    hf_model_class: Callable[[Any], type] | None = None  # cfg -> the transformers class of its HF folder
    reward_format: RewardFormat | None = None  # its reward models' text and outputs (score-reward)
    own_tokenizer: bool = False  # its converted checkpoints bring a tokenizer (hf/tokenizer.model) to use by default
    default_chat: str = "tanuki"  # conversation template of `tanuki generate/serve` when --chat is not given
    kind: str | None = None  # the "kind" tag of its to_dict() in tanuki.json (None: untagged = Tanuki)
    accepts_hf: Callable[[dict], bool] = lambda hf: False  # is this HF config.json ours to read?
    from_hf: Callable[[dict, str], Any] | None = None  # (config.json, where) -> cfg
    nemo_rules: Callable[[Any], Any] | None = None  # cfg -> NeMo zarr (Rule, Shape) pairs, streaming order
    from_nemo: Callable[..., Any] | None = None  # (model_config.yaml, where, vocab_rows, reward_outputs) -> cfg


def _tanuki_build(cfg, layout, opts=None, device=None):
    from megatron_tanuki.models.tanuki.builder import build_model

    return build_model(cfg, layout, opts, device=device)


def _vision_build(cfg, layout, opts=None, device=None):
    from megatron_tanuki.models.tanuki_vision.builder import build_vlm

    return build_vlm(cfg, layout, opts, device=device)


def _shape(cfg, hf_vocab: int):
    from megatron_tanuki.models.shapes import Shape

    return Shape(cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim, hf_vocab, cfg.vocab_size)


def _tanuki_rules(cfg, hf_vocab: int):
    from megatron_tanuki.models.tanuki import hf_map

    shape = _shape(cfg, hf_vocab)
    return ((rule, shape) for rule in hf_map.rules(cfg.num_layers, cfg.num_experts))


def _vision_rules(cfg, hf_vocab: int):
    from megatron_tanuki.models.tanuki_vision import hf_map

    return hf_map.rules(cfg, hf_vocab)


def _tanuki_from_hf(hf: dict, where: str):
    from megatron_tanuki.models.tanuki.hf_config import from_hf_config

    return from_hf_config(hf, where)


def _nemotron_rules(cfg, hf_vocab: int):
    from megatron_tanuki.models.nemotron4 import hf_map

    shape = _shape(cfg, hf_vocab)
    return ((rule, shape) for rule in hf_map.hf_rules(cfg.num_layers, bool(cfg.reward_outputs)))


def _nemotron_nemo_rules(cfg):
    from megatron_tanuki.models.nemotron4 import hf_map

    shape = _shape(cfg, cfg.vocab_size)
    return ((rule, shape) for rule in hf_map.nemo_rules(cfg.num_layers, bool(cfg.reward_outputs)))


def _nemotron_hf_config(cfg, hf_vocab: int) -> dict:
    from megatron_tanuki.models.nemotron4.hf_config import to_hf_config

    return to_hf_config(cfg, hf_vocab)


def _nemotron_from_hf(hf: dict, where: str):
    from megatron_tanuki.models.nemotron4.hf_config import from_hf_config

    return from_hf_config(hf, where)


def _nemotron_from_nemo(y: dict, where: str, vocab_rows: int, reward_outputs: int = 0):
    from megatron_tanuki.models.nemotron4.hf_config import from_nemo_config

    return from_nemo_config(y, where, vocab_rows, reward_outputs)


def _tanuki_hf_class(cfg) -> type:
    if cfg.is_moe:
        from megatron_tanuki.models.tanuki.hf import load_remote_code_classes

        return load_remote_code_classes()[1]
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM


def _nemotron_hf_class(cfg) -> type:
    from transformers import NemotronForCausalLM

    return NemotronForCausalLM


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
    flops_per_row=_flops, modes=("pretrain", "sft"), set_mode=lambda chunks, mode: None,
    accepts_hf=lambda hf: hf.get("model_type") in ("llama", "tanuki"), from_hf=_tanuki_from_hf,
    hf_model_class=_tanuki_hf_class)
TANUKI_VISION = Architecture(
    name="tanuki-vision", config_type=TanukiVisionConfig, presets=vision_presets.PRESETS,
    build=_vision_build, language_model=lambda cfg: cfg.llm,
    with_language_model=lambda cfg, llm: cfg.replace(llm=llm),
    hf_rules=_vision_rules, hf_config_out=_vision_hf_config, is_carried=_vision_carried,
    flops_per_row=_flops, modes=("vlm_stage1", "vlm_stage2"), set_mode=_vision_set_mode, kind="tanuki-vision",
    default_chat="llava-v1")
NEMOTRON4 = Architecture(
    name="nemotron4", config_type=nemotron4_config.Nemotron4Config, presets=nemotron4_config.PRESETS,
    build=_tanuki_build, language_model=lambda cfg: cfg, with_language_model=lambda cfg, llm: llm,
    hf_rules=_nemotron_rules, hf_config_out=_nemotron_hf_config, is_carried=lambda name, cfg: False,
    # a teacher here: training data, tokenizer and templates are Tanuki's, so `tanuki train` refuses it
    flops_per_row=_flops, modes=(), set_mode=lambda chunks, mode: None,
    kind=nemotron4_config.KIND, default_chat="nemotron4", own_tokenizer=True,
    reward_format=RewardFormat("nemotron4", nemotron4_config.REWARD_SYSTEM, nemotron4_config.REWARD_LABEL,
                               nemotron4_config.REWARD_ATTRIBUTES, nemotron4_config.REWARD_WEIGHTS),
    accepts_hf=lambda hf: hf.get("model_type") == "nemotron",
    from_hf=_nemotron_from_hf, hf_model_class=_nemotron_hf_class, nemo_rules=_nemotron_nemo_rules, from_nemo=_nemotron_from_nemo)
ARCHITECTURES = (TANUKI, TANUKI_VISION, NEMOTRON4)

PRESETS = {name: cfg for arch in ARCHITECTURES for name, cfg in arch.presets.items()}


def architecture_of(cfg) -> Architecture:
    """The record for a config object (a preset, or one read from tanuki.json / config.json)."""
    for arch in ARCHITECTURES:
        if isinstance(cfg, arch.config_type):
            return arch
    raise TypeError(f"no architecture is registered for {type(cfg).__name__}")


def config_from_dict(d: dict):
    """A config from its ``to_dict()`` (tanuki.json's "model"): the record whose ``kind`` tags it."""
    kind = d.get("kind")
    for arch in ARCHITECTURES:
        if arch.kind == kind:
            return arch.config_type.from_dict(d) if kind else arch.config_type(**d)
    raise KeyError(f"unknown model kind {kind!r}; known: {', '.join(a.kind for a in ARCHITECTURES if a.kind)}")


def from_hf_config(hf: dict, where: str = "config.json"):
    """The config of a language-model HF folder, read by the architecture that accepts its model_type."""
    for arch in ARCHITECTURES:
        if arch.from_hf is not None and arch.accepts_hf(hf):
            return arch.from_hf(hf, where)
    from megatron_tanuki.models.tanuki.hf_config import ConfigError

    raise ConfigError(f"{where}: unknown model_type {hf.get('model_type')!r}; expected 'llama' (Tanuki-8B), "
                      f"'tanuki' (Tanuki-8x8B) or 'nemotron' (Nemotron-4)")


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


def meta_model(cfg, dtype: str = "fp32"):
    """``cfg`` built whole (TP=PP=EP=1, one process) on the meta device: its parameters' names, shapes,
    parallel attributes and checkpoint layout without memory (model-info, --plan, the conversion writer)."""
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_single_process

    init_single_process(ParallelLayout(), language_model(cfg))
    return build(cfg, ParallelLayout(), BuildOptions(dtype=dtype, perform_initialization=False), device="meta")[0]


def get_preset(name: str):
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def model_info(name: str) -> dict:
    """Parameter counts of the whole model, built on the meta device (no memory, one process)."""
    from megatron_tanuki.models.tanuki.builder import count_parameters

    preset = get_preset(name)
    vision = preset if architecture_of(preset) is TANUKI_VISION else None
    cfg = language_model(preset)
    counts = count_parameters([meta_model(cfg)], cfg)
    info = {
        "preset": name,
        "architecture": ("moe" if cfg.is_moe else "dense") + ("+reward" if cfg.reward_outputs else ""),
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
        f" rope theta {c['rope_theta']:g}" + (f" on {c['rotary_percent']:.0%} of head dims"
                                              if c.get("rotary_percent", 1.0) != 1.0 else "")
        + f", max positions {c['max_position_embeddings']}",
    ]
    if c.get("reward_outputs"):
        lines.append(f"  reward head: {c['reward_outputs']} outputs at the last token")
    if c.get("num_experts"):
        lines.append(f"  experts {c['num_experts']}, top-{c['moe_topk']}, standardized router,"
                     f" aux-loss coeff {c['moe_aux_loss_coeff']}")
    if "parts" in info:
        lines.append("  parts: " + ", ".join(f"{k} {v:,} ({_human(v)})" for k, v in info["parts"].items()))
    lines.append(f"  parameters: total {p['total']:,} ({_human(p['total'])}),"
                 f" active per token {p['active']:,} ({_human(p['active'])})")
    return "\n".join(lines)
