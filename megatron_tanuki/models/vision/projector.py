"""LLaVA-JP's ``mlp2x_gelu`` projector on megatron-core's MultimodalProjector.

Linear(mm_hidden -> hidden, bias) -> GELU (erf) -> Linear(hidden -> hidden, bias); fc1 is column-
and fc2 row-parallel under TP. LLaVA-JP names: ``model.mm_projector.0.*`` and ``model.mm_projector.2.*``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

HF_NAMES = {
    "model.mm_projector.0.weight": "encoder.linear_fc1.weight",
    "model.mm_projector.0.bias": "encoder.linear_fc1.bias",
    "model.mm_projector.2.weight": "encoder.linear_fc2.weight",
    "model.mm_projector.2.bias": "encoder.linear_fc2.bias",
}


def projector_config(input_size: int, hidden_size: int, layout, dtype=torch.float32) -> TransformerConfig:
    from megatron_tanuki.runtime import cpu

    return TransformerConfig(
        num_layers=1, hidden_size=hidden_size, ffn_hidden_size=hidden_size,
        num_attention_heads=layout.tp,  # unused by the MLP; megatron checks divisibility by TP
        add_bias_linear=True, gated_linear_unit=False, activation_func=F.gelu,
        bias_activation_fusion=False, gradient_accumulation_fusion=False, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, use_cpu_initialization=cpu.is_active() or not cpu.gpu_present(),
        tensor_model_parallel_size=layout.tp, sequence_parallel=False, hidden_dropout=0.0)


def build_projector(input_size: int, hidden_size: int, layout, dtype=torch.float32) -> MultimodalProjector:
    cfg = projector_config(input_size, hidden_size, layout, dtype)
    return MultimodalProjector(cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                               projector_type="mlp", input_size=input_size)
