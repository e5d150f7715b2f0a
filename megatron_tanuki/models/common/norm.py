"""RMSNorm for the non-TE path that also works with sequence parallelism.

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
