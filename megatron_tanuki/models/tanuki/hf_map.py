"""Tanuki HF <-> megatron-core name map, as data.

Each rule: the HF tensor name(s), the megatron-core parameter name (a TP=PP=EP=1 model's local
name; the checkpoint writer turns it into sharded keys), and the *name* of the transform between
them (convert/transforms.py owns the functions). Both directions read this one table.
``{L}`` is the layer index, ``{E}`` the expert index.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    mcore: str
    transform: str = "identity"


EMBEDDING = Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "vocab_rows")
OUTPUT = Rule(("lm_head.weight",), "output_layer.weight", "vocab_rows")
FINAL_NORM = Rule(("model.norm.weight",), "decoder.final_layernorm.weight")

ATTENTION = (
    Rule(("model.layers.{L}.input_layernorm.weight",), "decoder.layers.{L}.input_layernorm.weight"),
    Rule(("model.layers.{L}.self_attn.q_proj.weight", "model.layers.{L}.self_attn.k_proj.weight",
          "model.layers.{L}.self_attn.v_proj.weight"),
         "decoder.layers.{L}.self_attention.linear_qkv.weight", "qkv_interleave"),
    Rule(("model.layers.{L}.self_attn.o_proj.weight",), "decoder.layers.{L}.self_attention.linear_proj.weight"),
    Rule(("model.layers.{L}.post_attention_layernorm.weight",), "decoder.layers.{L}.pre_mlp_layernorm.weight"),
)

DENSE_MLP = (
    Rule(("model.layers.{L}.mlp.gate_proj.weight", "model.layers.{L}.mlp.up_proj.weight"),
         "decoder.layers.{L}.mlp.linear_fc1.weight", "glu_concat"),
    Rule(("model.layers.{L}.mlp.down_proj.weight",), "decoder.layers.{L}.mlp.linear_fc2.weight"),
)

# Mixtral naming: w1 = gate, w3 = up, w2 = down.
MOE_ROUTER = Rule(("model.layers.{L}.block_sparse_moe.gate.weight",), "decoder.layers.{L}.mlp.router.weight")
MOE_EXPERT = (
    Rule(("model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
          "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight"),
         "decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc1.weight", "glu_concat"),
    Rule(("model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",),
         "decoder.layers.{L}.mlp.experts.local_experts.{E}.linear_fc2.weight"),
)

# HF buffers that are not weights (recomputed from the config).
IGNORED_HF = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def rules(num_layers: int, num_experts: int | None):
    """The concrete rules, layer by layer (the order conversion streams in)."""
    yield EMBEDDING
    for layer in range(num_layers):
        for r in ATTENTION:
            yield _fill(r, L=layer)
        if num_experts:
            yield _fill(MOE_ROUTER, L=layer)
            for e in range(num_experts):
                for r in MOE_EXPERT:
                    yield _fill(r, L=layer, E=e)
        else:
            for r in DENSE_MLP:
                yield _fill(r, L=layer)
    yield FINAL_NORM
    yield OUTPUT


def _fill(rule: Rule, **idx) -> Rule:
    return Rule(tuple(n.format(**idx) for n in rule.hf), rule.mcore.format(**idx), rule.transform)
