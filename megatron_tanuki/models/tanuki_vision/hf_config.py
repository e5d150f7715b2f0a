"""LLaVA-JP config.json <-> TanukiVisionConfig.

A LLaVA-JP checkpoint's config.json is the language model's config (Llama fields for Tanuki-8B,
Mixtral fields for the MoE; ``model_type`` "llava-jp") plus the ``mm_*`` fields LLaVA-JP adds:
``mm_vision_tower`` (a hub name or folder), ``mm_projector_type`` (we support ``mlp2x_gelu``),
``mm_hidden_size`` (tower width x number of scales), ``mm_vision_select_layer`` (-2),
``mm_vision_select_feature`` ("patch" drops token 0, "cls_patch" keeps it) and ``scales``
([1.0, 0.5] for S2, null without). The S2 geometry follows from ``scales`` and the tower
(``vision/s2.py``); a list LLaVA-JP's s2wrapper cannot run exactly is refused here, at conversion.

The SigLIP shape is not in that file. It comes from, in order: the ``--vision`` folder's
config.json; a ``vision_config`` entry (which our exports write, so they are self-contained);
``mm_vision_tower`` when it is a local folder; the known hub name of SigLIP-so400m.
"""
from __future__ import annotations

import json
import os

from megatron_tanuki.models.tanuki.hf_config import ConfigError, from_hf_config, to_hf_config
from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig
from megatron_tanuki.models.vision.s2 import NO_S2, S2GeometryError
from megatron_tanuki.models.vision.siglip import SIGLIP_SO400M, SiglipConfig

SO400M_HUB_NAME = "google/siglip-so400m-patch14-384"
PROJECTOR_TYPE = "mlp2x_gelu"
_SELECT_FEATURES = {"patch": True, "cls_patch": False}


def is_llava_jp(hf: dict) -> bool:
    return hf.get("model_type") == "llava-jp" or "mm_vision_tower" in hf


def siglip_from_hf(d: dict, source: str) -> SiglipConfig:
    """A SiglipVisionConfig dict (or a full SiglipConfig's ``vision_config``) -> SiglipConfig."""
    d = d.get("vision_config", d) if "vision_config" in d and "hidden_size" not in d else d
    act = d.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ConfigError(f"{source}: SigLIP hidden_act {act!r}; only 'gelu_pytorch_tanh' is supported")
    try:
        return SiglipConfig(
            name=d.get("_name_or_path") or "siglip", hidden_size=int(d["hidden_size"]),
            num_layers=int(d["num_hidden_layers"]), num_heads=int(d["num_attention_heads"]),
            ffn_hidden_size=int(d["intermediate_size"]), patch_size=int(d["patch_size"]),
            image_size=int(d["image_size"]), norm_eps=float(d.get("layer_norm_eps", 1e-6)))
    except KeyError as e:
        raise ConfigError(f"{source}: SigLIP config has no field {e.args[0]!r}") from None


def siglip_to_hf(v: SiglipConfig) -> dict:
    return {"model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
            "intermediate_size": v.ffn_hidden_size, "patch_size": v.patch_size, "image_size": v.image_size,
            "layer_norm_eps": v.norm_eps, "hidden_act": "gelu_pytorch_tanh", "num_channels": 3}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None


def _vision_config(hf: dict, source: str, vision_dir: str | None) -> SiglipConfig:
    if vision_dir:
        path = os.path.join(vision_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"--vision {vision_dir}: no config.json")
        return siglip_from_hf(_read_json(path), path)
    if "vision_config" in hf:
        return siglip_from_hf(hf["vision_config"], f"{source} (vision_config)")
    tower = hf.get("mm_vision_tower")
    if tower and os.path.isfile(os.path.join(tower, "config.json")):
        path = os.path.join(tower, "config.json")
        return siglip_from_hf(_read_json(path), path)
    if tower == SO400M_HUB_NAME:
        return SIGLIP_SO400M
    raise ConfigError(f"{source}: mm_vision_tower = {tower!r} is neither a local SigLIP folder nor "
                      f"{SO400M_HUB_NAME!r}; give the tower's folder with --vision DIR")


def from_llava_jp_config(hf: dict, source: str = "config.json", vision_dir: str | None = None) -> TanukiVisionConfig:
    ptype = hf.get("mm_projector_type")
    if ptype != PROJECTOR_TYPE:
        raise ConfigError(f"{source}: mm_projector_type {ptype!r}; Tanuki-vision uses {PROJECTOR_TYPE!r}")
    feature = hf.get("mm_vision_select_feature", "patch")
    if feature not in _SELECT_FEATURES:
        raise ConfigError(f"{source}: mm_vision_select_feature {feature!r}; expected one of {sorted(_SELECT_FEATURES)}")
    llm_fields = {**hf, "model_type": "tanuki" if "num_local_experts" in hf else "llama"}
    llm = from_hf_config(llm_fields, source)
    vision = _vision_config(hf, source, vision_dir).replace(
        select_layer=int(hf.get("mm_vision_select_layer", -2)), drop_first_token=_SELECT_FEATURES[feature])
    if not -vision.num_layers <= vision.select_layer < 0:
        raise ConfigError(f"{source}: mm_vision_select_layer {vision.select_layer} outside "
                          f"[-{vision.num_layers}, -1] for a {vision.num_layers}-layer tower")
    scales = _scales(hf.get("scales"), source)
    mm_hidden = hf.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision.hidden_size * len(scales):
        raise ConfigError(f"{source}: mm_hidden_size {mm_hidden} != SigLIP hidden {vision.hidden_size} x "
                          f"{len(scales)} scales")
    try:
        return TanukiVisionConfig(name=f"{hf.get('_name_or_path') or 'llava-jp'}", llm=llm, vision=vision,
                                  s2_scales=scales)
    except S2GeometryError as e:
        raise ConfigError(f"{source}: scales {list(scales)} with a {vision.image_size}-px SigLIP tile: {e}") from None


def _scales(raw, source: str) -> tuple[float, ...]:
    """LLaVA-JP's ``scales``: null (no S2) or a non-empty list of positive numbers."""
    if raw is None:
        return NO_S2
    if (not isinstance(raw, list) or not raw
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in raw)):
        raise ConfigError(f"{source}: scales {raw!r}; expected null or a non-empty list of positive numbers")
    return tuple(float(s) for s in raw)


def to_llava_jp_config(cfg: TanukiVisionConfig, hf_vocab: int | None = None) -> dict:
    """config.json for a checkpoint that came from training (no source config to carry)."""
    v = cfg.vision
    llm = to_hf_config(cfg.llm, hf_vocab)
    arch = "LlavaTanukiForCausalLM" if cfg.is_moe else "LlavaLlamaForCausalLM"
    return {**llm, "model_type": "llava-jp", "architectures": [arch],
            "mm_vision_tower": SO400M_HUB_NAME if v.replace(name=SIGLIP_SO400M.name, select_layer=-2,
                                                             drop_first_token=True) == SIGLIP_SO400M else v.name,
            "mm_projector_type": PROJECTOR_TYPE, "mm_hidden_size": cfg.projector_input_size,
            "mm_vision_select_layer": v.select_layer,
            "mm_vision_select_feature": "patch" if v.drop_first_token else "cls_patch",
            "scales": list(cfg.s2_scales) if cfg.s2.is_s2 else None, "use_mm_proj": True,
            "vision_config": siglip_to_hf(v)}
