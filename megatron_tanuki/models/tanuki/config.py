"""Tanuki architecture settings as plain data: the presets live here and nowhere else.

Numbers come from the released HF configs of Tanuki-8B / Tanuki-8x8B and the seed team's
Megatron-LM launch scripts. A preset is frozen; derive variants with `dataclasses.replace`
(e.g. the 8x8B-vision-exp language model with rope_theta=10000, 2048 positions).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class TanukiConfig:
    name: str
    vocab_size: int = 65024  # SentencePiece 65000 pieces padded to a multiple of 128
    hidden_size: int = 4096
    num_layers: int = 32
    num_attention_heads: int = 32
    num_query_groups: int = 8  # KV heads (GQA)
    ffn_hidden_size: int = 14336  # SwiGLU inner size (per expert for the MoE)
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 8192
    tie_embeddings: bool = False
    # Mixture of experts; None means a dense Llama-style MLP.
    num_experts: int | None = None
    moe_topk: int = 2
    moe_aux_loss_coeff: float = 0.001
    # Tanuki's one difference from Mixtral: router logits standardized per token.
    router_standardize: bool = True

    # What the generic GPT builder reads (Nemotron4Config has the same names, other values).
    activation: ClassVar[str] = "swiglu"
    normalization: ClassVar[str] = "rmsnorm"
    rotary_percent: ClassVar[float] = 1.0
    reward_outputs: ClassVar[int] = 0

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> "TanukiConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TANUKI_8B = TanukiConfig(name="tanuki-8b")
TANUKI_8X8B = TanukiConfig(name="tanuki-8x8b", num_experts=8, max_position_embeddings=4096)

# Tiny shapes for tests and the CPU demo: same vocab (the real tokenizer), same head/KV ratio,
# top-2 of 8 experts; 4 layers so that PP=2 (and virtual stages of 1 layer) divide evenly.
TANUKI_8B_TINY = TANUKI_8B.replace(
    name="tanuki-8b-tiny", hidden_size=64, num_layers=4, num_attention_heads=4,
    num_query_groups=2, ffn_hidden_size=160, max_position_embeddings=512)
TANUKI_8X8B_TINY = TANUKI_8B_TINY.replace(
    name="tanuki-8x8b-tiny", num_experts=8, ffn_hidden_size=96, max_position_embeddings=512)

PRESETS: dict[str, TanukiConfig] = {
    c.name: c for c in (TANUKI_8B, TANUKI_8X8B, TANUKI_8B_TINY, TANUKI_8X8B_TINY)
}
