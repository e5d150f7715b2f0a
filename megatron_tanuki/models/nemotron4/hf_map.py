"""Nemotron-4 name tables, as data: HF ``NemotronForCausalLM`` <-> megatron-core, NeMo zarr <-> megatron-core.

Same Rule form as the Tanuki table (models/tanuki/hf_map.py): source name(s), the TP=1 megatron
parameter name, the transform's name. ``{L}`` is the layer index.

The NeMo table's source names are the zarr checkpoint's keys without ``model.``, one name per layer
slice of a stacked key (convert/nemo_zarr.py presents them so). They are megatron-core's own sharded
keys of the TE spec, so most rules are identities; the norms differ only in name: TE fuses them into
the following linear (``linear_qkv.layer_norm_weight``), our local spec keeps them as modules.
"""
from __future__ import annotations

from megatron_tanuki.models.tanuki.hf_map import Rule, _fill

HF_EMBEDDING = Rule(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", "vocab_rows")
HF_OUTPUT = Rule(("lm_head.weight",), "output_layer.weight", "vocab_rows")
HF_FINAL_NORM = tuple(Rule((f"model.norm.{p}",), f"decoder.final_layernorm.{p}") for p in ("weight", "bias"))
HF_LAYER = (
    *(Rule((f"model.layers.{{L}}.input_layernorm.{p}",), f"decoder.layers.{{L}}.input_layernorm.{p}")
      for p in ("weight", "bias")),
    Rule(("model.layers.{L}.self_attn.q_proj.weight", "model.layers.{L}.self_attn.k_proj.weight",
          "model.layers.{L}.self_attn.v_proj.weight"),
         "decoder.layers.{L}.self_attention.linear_qkv.weight", "qkv_interleave"),
    Rule(("model.layers.{L}.self_attn.o_proj.weight",), "decoder.layers.{L}.self_attention.linear_proj.weight"),
    *(Rule((f"model.layers.{{L}}.post_attention_layernorm.{p}",), f"decoder.layers.{{L}}.pre_mlp_layernorm.{p}")
      for p in ("weight", "bias")),
    Rule(("model.layers.{L}.mlp.up_proj.weight",), "decoder.layers.{L}.mlp.linear_fc1.weight"),
    Rule(("model.layers.{L}.mlp.down_proj.weight",), "decoder.layers.{L}.mlp.linear_fc2.weight"),
)
# transformers has no Nemotron reward class: an exported reward model is NemotronForCausalLM plus these
# two tensors under their NeMo names (from_pretrained loads the language model and reports them unused).
REWARD_HEAD = tuple(Rule((f"rm_head.{p}",), f"rm_head.{p}") for p in ("weight", "bias"))

NEMO_EMBEDDING = Rule(("embedding.word_embeddings.weight",), "embedding.word_embeddings.weight")
NEMO_OUTPUT = Rule(("output_layer.weight",), "output_layer.weight")
NEMO_FINAL_NORM = tuple(Rule((f"decoder.final_layernorm.{p}",), f"decoder.final_layernorm.{p}")
                        for p in ("weight", "bias"))
NEMO_LAYER = (
    *(Rule((f"decoder.layers.{{L}}.self_attention.linear_qkv.layer_norm_{p}",),
           f"decoder.layers.{{L}}.input_layernorm.{p}") for p in ("weight", "bias")),
    Rule(("decoder.layers.{L}.self_attention.linear_qkv.weight",), "decoder.layers.{L}.self_attention.linear_qkv.weight"),
    Rule(("decoder.layers.{L}.self_attention.linear_proj.weight",),
         "decoder.layers.{L}.self_attention.linear_proj.weight"),
    *(Rule((f"decoder.layers.{{L}}.mlp.linear_fc1.layer_norm_{p}",), f"decoder.layers.{{L}}.pre_mlp_layernorm.{p}")
      for p in ("weight", "bias")),
    Rule(("decoder.layers.{L}.mlp.linear_fc1.weight",), "decoder.layers.{L}.mlp.linear_fc1.weight"),
    Rule(("decoder.layers.{L}.mlp.linear_fc2.weight",), "decoder.layers.{L}.mlp.linear_fc2.weight"),
)


def _rules(embedding, layer, final_norm, output, num_layers: int, reward: bool):
    yield embedding
    for i in range(num_layers):
        for r in layer:
            yield _fill(r, L=i)
    yield from final_norm
    yield output
    if reward:
        yield from REWARD_HEAD


def hf_rules(num_layers: int, reward: bool = False):
    """HF NemotronForCausalLM rules in streaming order."""
    return _rules(HF_EMBEDDING, HF_LAYER, HF_FINAL_NORM, HF_OUTPUT, num_layers, reward)


def nemo_rules(num_layers: int, reward: bool = False):
    """NeMo zarr rules in streaming order (one layer slice at a time)."""
    return _rules(NEMO_EMBEDDING, NEMO_LAYER, NEMO_FINAL_NORM, NEMO_OUTPUT, num_layers, reward)
