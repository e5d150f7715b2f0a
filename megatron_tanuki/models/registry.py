"""Preset name -> (architecture config, builder). `tanuki model-info` and every entry point read it."""
from __future__ import annotations

from megatron_tanuki.models.tanuki import config as tanuki_config
from megatron_tanuki.models.tanuki_vision import presets as vision_presets

PRESETS = {**tanuki_config.PRESETS, **vision_presets.PRESETS}


def get_preset(name: str):
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def model_info(name: str) -> dict:
    """Parameter counts of the whole model, built on the meta device (no memory, one process)."""
    from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model, count_parameters
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_single_process

    preset = get_preset(name)
    vision = preset if isinstance(preset, vision_presets.TanukiVisionConfig) else None
    cfg = vision.llm if vision else preset
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
