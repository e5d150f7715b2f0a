"""Tiny random LLaVA-JP checkpoints (the seed team's saved layout), built from transformers parts."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from megatron_tanuki.models.vision.siglip import SIGLIP_TINY
from tests.convert import tiny_hf

TOWER = "model.vision_tower.vision_tower."


def siglip(seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = SIGLIP_TINY
    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.norm_eps)).eval()


def _save(state: dict, folder: str, config: dict) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return folder


def build(base: str, moe: bool, tower_inside: bool = True, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """Writes ``base/llava`` (and ``base/siglip``); returns their paths."""
    llm = tiny_hf.moe_model(seed) if moe else tiny_hf.dense_model(seed)
    vit = siglip(seed + 1)
    hidden, scales = llm.config.hidden_size, [1.0, 0.5]
    torch.manual_seed(seed + 2)
    mm_in = vit.config.hidden_size * len(scales)
    projector = {"model.mm_projector.0.weight": torch.randn(hidden, mm_in) * 0.1,
                 "model.mm_projector.0.bias": torch.randn(hidden) * 0.1,
                 "model.mm_projector.2.weight": torch.randn(hidden, hidden) * 0.1,
                 "model.mm_projector.2.bias": torch.randn(hidden) * 0.1}
    siglip_dir = os.path.join(base, "siglip")
    vit_config = {**vit.config.to_dict(), "architectures": ["SiglipVisionModel"]}
    # transformers 4.x names (what LLaVA-JP and the hub SigLIP files hold): vision_model.*
    vit_state = {"vision_model." + k.removeprefix("vision_model."): v.to(dtype) for k, v in vit.state_dict().items()}
    if tower_inside:
        _write_config_only(siglip_dir, vit_config)
    else:
        _save(vit_state, siglip_dir, vit_config)
    llm_config = llm.config.to_dict()
    config = {**{k: v for k, v in llm_config.items() if k not in ("auto_map",)},
              "model_type": "llava-jp",
              "architectures": ["LlavaTanukiForCausalLM" if moe else "LlavaLlamaForCausalLM"],
              "mm_vision_tower": siglip_dir, "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": mm_in,
              "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "scales": scales,
              "use_mm_proj": True}
    state = _saved_tensors(llm, os.path.join(base, "llm-only"), dtype)  # on-disk (Mixtral) names
    state.update({k: v.to(dtype) for k, v in projector.items()})
    if tower_inside:
        state.update({TOWER + k: v for k, v in vit_state.items()})
    llava_dir = _save(state, os.path.join(base, "llava"), config)
    return {"llava": llava_dir, "siglip": siglip_dir}


def _saved_tensors(model, folder: str, dtype) -> dict:
    from safetensors import safe_open

    tiny_hf.save(model, folder, dtype=dtype)
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _write_config_only(folder: str, config: dict) -> None:
    """What the hub cache gives LLaVA-JP for ``mm_vision_tower``: here only the config is needed."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
