"""Model FLOPs of Tanuki and Tanuki-vision, as training reports them and the benchmark measures them.

Convention of ../shared/probes (so numbers compare with the H100 baselines there): a trained matmul
costs 3 x its forward FLOPs (forward, input grad, weight grad), causal attention counts half, norms
and activations are not counted. The frozen SigLIP tower runs forward only (1 x), on every S2 tile:
how many tiles an image makes comes from the config's S2 geometry, the same derivation the model
uses.
"""
from __future__ import annotations

from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig


def model_flops_per_step(cfg, layers: int, seq: int, batch: int) -> float:
    """3 x forward matmul FLOPs of ``layers`` Tanuki layers (no embedding / output layer)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    proj = 2 * h * (cfg.num_attention_heads * hd * 2 + 2 * cfg.num_query_groups * hd)
    attn = 2 * 2 * seq * cfg.num_attention_heads * hd / 2  # QK^T and PV, causal half
    if cfg.is_moe:
        mlp = cfg.moe_topk * 3 * 2 * h * cfg.ffn_hidden_size + 2 * h * cfg.num_experts
    else:
        mlp = (3 if cfg.activation == "swiglu" else 2) * 2 * h * cfg.ffn_hidden_size  # gated: 3 matrices
    return 3 * (proj + attn + mlp) * seq * batch * layers


def output_layer_flops(cfg, seq: int) -> float:
    """3 x the vocabulary projection of ``seq`` tokens."""
    return 3 * 2 * cfg.hidden_size * cfg.vocab_size * seq


def vision_flops(vcfg, tiles: int) -> float:
    """Forward FLOPs of the (frozen) SigLIP tower over ``tiles`` tiles: it gets no backward."""
    h, f, n = vcfg.hidden_size, vcfg.ffn_hidden_size, vcfg.num_patches
    per_layer = 2 * n * (4 * h * h + 2 * h * f) + 2 * 2 * n * n * h  # projections+MLP, QK^T+PV
    return per_layer * vcfg.layers_to_build * tiles


def projector_flops(cfg: TanukiVisionConfig) -> float:
    """3 x the mlp2x_gelu projector over one image's tokens."""
    h = cfg.llm.hidden_size
    return 3 * 2 * cfg.num_image_tokens * (cfg.projector_input_size * h + h * h)


def image_flops(cfg: TanukiVisionConfig) -> float:
    """One image: the tower on each of its S2 tiles, then the projector."""
    return vision_flops(cfg.vision, cfg.s2.tower_runs) + projector_flops(cfg)


def flops_per_row(mcfg, seq: int, images: int = 0) -> float:
    """One training row of ``seq`` tokens holding ``images`` images: all layers, the output layer and,
    for Tanuki-vision, each image's tower runs and projector."""
    vision = mcfg if isinstance(mcfg, TanukiVisionConfig) else None
    llm = vision.llm if vision else mcfg
    f = model_flops_per_step(llm, llm.num_layers, seq, 1) + output_layer_flops(llm, seq)
    if vision and images:
        f += image_flops(vision) * images
    return f
