"""The Tanuki router: Mixtral's top-k router with per-token standardized logits.

Tanuki-8x8B differs from Mixtral in exactly one place. Before routing, each token's router logits
are standardized over the experts, ``(logits - mean) / (std + 1e-5)`` with the unbiased std. Then
it is Mixtral: softmax over all experts, top-k, renormalize over the k -- equivalently top-k on the
logits then softmax over those k, which is megatron-core's default (``moe_router_pre_softmax``
off). The standardized logits also feed the load-balancing loss: both go through ``gating``.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter

STANDARDIZE_EPS = 1e-5


def standardize_logits(logits: torch.Tensor, eps: float = STANDARDIZE_EPS) -> torch.Tensor:
    """Per-row standardization over the last dim, unbiased std (as torch.std, the seed code)."""
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True, unbiased=True)
    return (logits - mean) / (std + eps)


class TanukiRouter(TopKRouter):
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        return standardize_logits(super().gating(input))
