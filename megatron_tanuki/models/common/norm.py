"""Norms for the non-TE path that also work with sequence parallelism (RMSNorm, LayerNorm, LayerNorm1p).

megatron-core's local spec uses ``WrappedTorchNorm``, which refuses ``sequence_parallel``; yet MoE
with TP > 1 needs SP. An RMSNorm is per-token, so it is correct on a sequence shard as it is; the
only SP duty is that its weight gradient be summed over the TP group, which megatron-core's grad
finalization does for every parameter carrying ``sequence_parallel=True``.

The arithmetic is the HF Llama one (normalize in fp32, cast back, then scale), so converted
checkpoints give the same numbers as transformers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TanukiRMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused kernel on GPU; in fp32 it is HF's x * rsqrt(mean(x^2) + eps).
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * h.to(x.dtype)


class TanukiLayerNorm(torch.nn.LayerNorm):
    """LayerNorm (SigLIP tower) whose weight and bias carry the sequence-parallel tag, for the
    same reason as TanukiRMSNorm: megatron's WrappedTorchNorm refuses sequence parallelism."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in (self.weight, self.bias):
            p.sequence_parallel = bool(config.sequence_parallel)


class LayerNorm1p(torch.nn.Module):
    """LayerNorm with a zero-centred gamma (Nemotron-4's ``layernorm1p``): ``y = norm(x) * (1 + w) + b``.

    megatron-core implements ``layernorm_zero_centered_gamma`` only in Apex's FusedLayerNorm and in
    Transformer Engine; its torch ``WrappedTorchNorm`` refuses it (and sequence parallelism). Like TE,
    the normalization and ``1 + w`` run in fp32 and the result is cast back, so a bf16 ``w`` near 0
    keeps its precision; in fp32 it is transformers' ``NemotronLayerNorm1P`` exactly. Per token, so
    correct on a sequence-parallel shard; weight and bias carry the SP tag for the gradient sum.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in (self.weight, self.bias):
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x.float(), (x.shape[-1],), self.weight.float() + 1.0, self.bias.float(), self.eps)
        return h.to(x.dtype)
