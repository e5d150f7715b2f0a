"""SigLIP (transformers SiglipVisionModel) <-> our SiglipTower name map, as data.

``{P}`` is the HF prefix of the vision tower (``vision_model.`` in a SigLIP folder,
``model.vision_tower.vision_tower.vision_model.`` inside a LLaVA-JP checkpoint); ``{L}`` a layer.
Only the layers the tower builds are mapped; the unused last layer, the post LayerNorm and the
pooling head are carried through conversion untouched (LLaVA-JP issue).
"""
from __future__ import annotations

from megatron_tanuki.models.tanuki.hf_map import Rule

EMBEDDINGS = (
    Rule(("{P}embeddings.patch_embedding.weight",), "conv1.weight"),
    Rule(("{P}embeddings.patch_embedding.bias",), "conv1.bias"),
    Rule(("{P}embeddings.position_embedding.weight",), "position_embeddings.weight"),
)

LAYER = (
    Rule(("{P}encoder.layers.{L}.layer_norm1.weight",), "decoder.layers.{L}.input_layernorm.weight"),
    Rule(("{P}encoder.layers.{L}.layer_norm1.bias",), "decoder.layers.{L}.input_layernorm.bias"),
    Rule(("{P}encoder.layers.{L}.self_attn.q_proj.weight", "{P}encoder.layers.{L}.self_attn.k_proj.weight",
          "{P}encoder.layers.{L}.self_attn.v_proj.weight"),
         "decoder.layers.{L}.self_attention.linear_qkv.weight", "qkv_interleave"),
    Rule(("{P}encoder.layers.{L}.self_attn.q_proj.bias", "{P}encoder.layers.{L}.self_attn.k_proj.bias",
          "{P}encoder.layers.{L}.self_attn.v_proj.bias"),
         "decoder.layers.{L}.self_attention.linear_qkv.bias", "qkv_interleave"),
    Rule(("{P}encoder.layers.{L}.self_attn.out_proj.weight",), "decoder.layers.{L}.self_attention.linear_proj.weight"),
    Rule(("{P}encoder.layers.{L}.self_attn.out_proj.bias",), "decoder.layers.{L}.self_attention.linear_proj.bias"),
    Rule(("{P}encoder.layers.{L}.layer_norm2.weight",), "decoder.layers.{L}.pre_mlp_layernorm.weight"),
    Rule(("{P}encoder.layers.{L}.layer_norm2.bias",), "decoder.layers.{L}.pre_mlp_layernorm.bias"),
    Rule(("{P}encoder.layers.{L}.mlp.fc1.weight",), "decoder.layers.{L}.mlp.linear_fc1.weight"),
    Rule(("{P}encoder.layers.{L}.mlp.fc1.bias",), "decoder.layers.{L}.mlp.linear_fc1.bias"),
    Rule(("{P}encoder.layers.{L}.mlp.fc2.weight",), "decoder.layers.{L}.mlp.linear_fc2.weight"),
    Rule(("{P}encoder.layers.{L}.mlp.fc2.bias",), "decoder.layers.{L}.mlp.linear_fc2.bias"),
)


def rules(num_layers_built: int, prefix: str = "vision_model."):
    for r in EMBEDDINGS:
        yield Rule(tuple(n.format(P=prefix) for n in r.hf), r.mcore, r.transform)
    for layer in range(num_layers_built):
        for r in LAYER:
            yield Rule(tuple(n.format(P=prefix, L=layer) for n in r.hf), r.mcore.format(L=layer), r.transform)
