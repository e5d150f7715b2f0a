"""LLaVA-JP checkpoint <-> Tanuki-vision name map: the three part tables, prefixed.

The LLaVA-JP state dict is the language model's own names (``model.*``, ``lm_head.*``) plus the
projector (``model.mm_projector.{0,2}.*``) and the SigLIP tower under ``TOWER_PREFIX``. On the
megatron side the parts are the TanukiVisionModel attributes ``language_model``,
``vision_projection`` and ``vision_model``. Each rule travels with the Shape its transform needs
(the LLM's heads for its QKV, the tower's for its own).

Tower tensors the model never computes (layers after the selected one, the post LayerNorm, the
pooling head) are *carried*: stored beside the megatron checkpoint and written back unchanged.
"""
from __future__ import annotations

import re

from megatron_tanuki.models.shapes import Shape
from megatron_tanuki.models.tanuki import hf_map as llm_map
from megatron_tanuki.models.tanuki.hf_map import Rule
from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig
from megatron_tanuki.models.vision import hf_map as vision_map
from megatron_tanuki.models.vision.projector import HF_NAMES as PROJECTOR_NAMES

TOWER_PREFIX = "model.vision_tower.vision_tower."  # + "vision_model.*" (SiglipVisionModel names)
LLM, PROJECTOR, TOWER = "language_model.", "vision_projection.", "vision_model."


def llm_shape(cfg: TanukiVisionConfig, hf_vocab: int) -> Shape:
    c = cfg.llm
    return Shape(c.num_attention_heads, c.num_query_groups, c.head_dim, hf_vocab, c.vocab_size)


def tower_shape(cfg: TanukiVisionConfig) -> Shape:
    v = cfg.vision
    return Shape(v.num_heads, v.num_heads, v.hidden_size // v.num_heads, 0, 0)  # one KV group per head


def rules(cfg: TanukiVisionConfig, hf_vocab: int):
    """(Rule, Shape) pairs with full megatron parameter names, in streaming order."""
    shape = llm_shape(cfg, hf_vocab)
    for r in llm_map.rules(cfg.llm.num_layers, cfg.llm.num_experts):
        yield Rule(r.hf, LLM + r.mcore, r.transform), shape
    for hf, mc in PROJECTOR_NAMES.items():
        yield Rule((hf,), PROJECTOR + mc), shape
    tshape = tower_shape(cfg)
    for r in vision_map.rules(cfg.vision.layers_to_build, prefix=TOWER_PREFIX + "vision_model."):
        yield Rule(r.hf, TOWER + r.mcore, r.transform), tshape


def is_carried(name: str, cfg: TanukiVisionConfig) -> bool:
    """A tower tensor the model does not use (kept bit-exact through conversion)."""
    rest = name.removeprefix(TOWER_PREFIX + "vision_model.")
    if rest == name:
        return False
    m = re.match(r"encoder\.layers\.(\d+)\.", rest)
    if m:
        return int(m.group(1)) >= cfg.vision.layers_to_build
    return rest.startswith(("post_layernorm.", "head."))
