"""Nemotron-4 architecture settings as plain data; the presets live here and nowhere else.

Numbers from the released ``model_config.yaml`` of Nemotron-4-340B and the 15B report: a GPT with
grouped-query attention, RoPE on the first half of each head's dims (base 10000), an ungated MLP
``up -> squared ReLU -> down``, LayerNorm1p (zero-centred gamma: the stored weight w scales by
``1 + w``) with bias, no linear biases, untied embeddings, a 256000-piece SentencePiece.

The Reward variant is the same trunk plus ``rm_head`` (``reward_outputs`` = 9 values read at the
last token; the last five are the HelpSteer2 attributes, weighted by ``REWARD_WEIGHTS``).

Fields the generic builder reads (activation, normalization, rotary_percent) are class constants
shared with TanukiConfig's, so ``tanuki.json`` holds only what varies between Nemotron-4 models.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

KIND = "nemotron4"
REWARD_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
REWARD_WEIGHTS = (0.3, 0.74, 0.46, 0.47, -0.33)  # the model card's weighted sum of the last five
# NeMo-Aligner's reward text: the chat turns (template nemotron4) with its SteerLM default system prompt
# unless the conversation brings one, then the label prefix after the answer's newline; read at its last token
REWARD_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
REWARD_LABEL = "<extra_id_2>"


@dataclass(frozen=True)
class Nemotron4Config:
    name: str
    vocab_size: int = 256000
    hidden_size: int = 18432
    num_layers: int = 96
    num_attention_heads: int = 96
    num_query_groups: int = 8
    ffn_hidden_size: int = 73728
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_percent: float = 0.5
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    reward_outputs: int = 0  # 9 for Nemotron-4-340B-Reward's rm_head; 0: a language model

    activation: ClassVar[str] = "squared_relu"
    normalization: ClassVar[str] = "layernorm1p"
    num_experts: ClassVar[None] = None
    moe_topk: ClassVar[int] = 0
    router_standardize: ClassVar[bool] = False

    @property
    def is_moe(self) -> bool:
        return False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> "Nemotron4Config":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {"kind": KIND, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "Nemotron4Config":
        return cls(**{k: v for k, v in d.items() if k != "kind"})


NEMOTRON4_340B = Nemotron4Config(name="nemotron4-340b")
NEMOTRON4_340B_REWARD = NEMOTRON4_340B.replace(name="nemotron4-340b-reward", reward_outputs=9)
NEMOTRON4_15B = NEMOTRON4_340B.replace(
    name="nemotron4-15b", hidden_size=6144, num_layers=32, num_attention_heads=48, ffn_hidden_size=24576)
# Tiny shapes for tests: the layout of the NeMo zarr fixture (tests/data/nemo-zarr-tiny): 4 layers so PP=2
# divides, 16 heads / 8 KV groups so TP=2 and TP=8 divide, head dim 4 of which RoPE takes 2.
NEMOTRON4_TINY = NEMOTRON4_340B.replace(
    name="nemotron4-tiny", vocab_size=256, hidden_size=64, num_layers=4, num_attention_heads=16,
    ffn_hidden_size=128, max_position_embeddings=64)
NEMOTRON4_TINY_REWARD = NEMOTRON4_TINY.replace(name="nemotron4-tiny-reward", reward_outputs=9)

PRESETS: dict[str, Nemotron4Config] = {
    c.name: c for c in (NEMOTRON4_340B, NEMOTRON4_340B_REWARD, NEMOTRON4_15B, NEMOTRON4_TINY,
                        NEMOTRON4_TINY_REWARD)
}
