"""MoE experts as two grouped GEMMs (``torch._grouped_mm``), for the local (non-TE) spec.

A drop-in for megatron-core's SequentialMLP: the same submodules and parameters
(``local_experts.{i}.linear_fc1/2.weight``), so the same state_dict, sharded_state_dict (checkpoint
keys ``experts.linear_fc1.weight`` with the expert axis, as TEGroupedMLP writes too) and conversion
table names. Only the forward differs: every local expert's tokens go through one grouped GEMM per
linear layer instead of one GEMM per expert. The math is MLP's (GLU halves of linear_fc1's local
output, activation, per-token probs before linear_fc2, in the activation's dtype), so in fp32 it
equals SequentialMLP exactly, forward and gradients.

Experts never communicate here (megatron-core's expert linears are ``explicit_expert_comm``: the
token dispatcher does the TP/EP exchanges), so the local weight shards are all there is.

Cases the grouped kernel does not take fall back to SequentialMLP's own forward (exact, slower):
biases, FP8/FP4, TE or fused activations, inner sizes whose rows are not a multiple of 16 bytes
(``torch._grouped_mm`` requires that), and on CUDA any dtype but bf16 (its CUDA kernel refuses fp32;
the CPU one takes fp32 and bf16, bit-exact against SequentialMLP in both).
The weights are stacked per forward (one copy of the local experts' weights).
"""
from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: ``torch._grouped_mm``'s
    backward rejects a zero-stride gradient (e.g. from ``.sum()``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x[rows of group g] @ weights[g].T`` for every group g; ``offsets``: int32 cumulative row ends."""
    return _ContiguousGrad.apply(torch._grouped_mm(x, weights.transpose(1, 2), offs=offsets))


class GroupedGemmMLP(SequentialMLP):
    """SequentialMLP's parameters and checkpoint layout, computed with two grouped GEMMs."""

    def _grouped_ok(self, hidden: torch.Tensor) -> bool:
        cfg = self.config
        experts = self.local_experts
        if (cfg.fp8 or cfg.fp4 or cfg.use_te_activation_func or cfg.bias_activation_fusion
                or cfg.moe_apply_probs_on_input):
            return False
        if any(e.linear_fc1.bias is not None or e.linear_fc2.bias is not None for e in experts):
            return False
        if experts[0].linear_fc1.weight.dtype != hidden.dtype:
            return False
        if hidden.is_cuda and hidden.dtype != torch.bfloat16:  # CUDA's kernel: bf16 (fp16 on few builds)
            return False
        align = 16 // hidden.element_size()
        fc1_out, h = experts[0].linear_fc1.weight.shape
        fc2_in = experts[0].linear_fc2.weight.shape[1]
        return all(n % align == 0 for n in (h, fc1_out, fc2_in))

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not cfg.gated_linear_unit:
            return cfg.activation_func(x)
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        if (val := cfg.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        return cfg.activation_func(x_glu) * (x_linear + cfg.glu_linear_offset)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        hidden = permuted_local_hidden_states
        self.last_forward_grouped = self._grouped_ok(hidden)  # which path ran (the benchmark reports it)
        if not self.last_forward_grouped:
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        offsets = torch.as_tensor(tokens_per_expert).to(hidden.device).cumsum(0).to(torch.int32)
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])
        inter = self._activation(grouped_mm(hidden, w1, offsets))
        dtype = inter.dtype
        inter = (inter * permuted_probs.unsqueeze(-1)).to(dtype)
        return grouped_mm(inter, w2, offsets), None
