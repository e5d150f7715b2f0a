"""Layer specs: Transformer Engine when it can run, else megatron-core's local modules made fast.

* TE importable and a GPU present: megatron-core's TE spec (fused norm+linear, TE attention,
  grouped-GEMM experts), which is also what FP8 needs.
* Otherwise (CPU, or a GPU without TE): the local spec with three swaps -- SDPA as the core
  attention (never the unfused DotProductAttention), our norms (sequence-parallel capable: RMSNorm
  for Tanuki, LayerNorm1p for Nemotron-4), and, for MoE, the Tanuki router and (``grouped_gemm``)
  experts as grouped GEMMs (common/grouped_experts.py; SequentialMLP's parameters and checkpoint keys).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_tanuki.models.common.grouped_experts import GroupedGemmMLP
from megatron_tanuki.models.common.norm import LayerNorm1p, TanukiRMSNorm
from megatron_tanuki.models.common.sdpa_attention import SDPAttention
from megatron_tanuki.runtime import cpu


def te_available() -> bool:
    """Transformer Engine is usable: importable and a GPU to run it on. ``TANUKI_TE=0`` turns it
    off (the non-TE GPU path, e.g. tools/gpu_smoke.sh runs both)."""
    if os.environ.get("TANUKI_TE") == "0":
        return False
    return cpu.gpu_present() and importlib.util.find_spec("transformer_engine") is not None


# A config's ``normalization`` -> (megatron-core's name for the TE spec, our module for the local spec).
NORMS = {"rmsnorm": ("RMSNorm", TanukiRMSNorm), "layernorm1p": ("LayerNorm", LayerNorm1p)}


def _with_moe(mlp_builder, **changes):
    """Return the MoE builder (a functools.partial of MoELayer) with submodules replaced (router, experts)."""
    subs = mlp_builder.keywords["submodules"]
    keywords = dict(mlp_builder.keywords, submodules=dataclasses.replace(subs, **changes))
    return functools.partial(mlp_builder.func, *mlp_builder.args, **keywords)


def grouped_gemm_default(use_te: bool) -> bool:
    """Grouped-GEMM experts unless asked otherwise: TE's on a TE build, ours on a GPU without TE;
    SequentialMLP on CPU."""
    return use_te or (cpu.gpu_present() and not cpu.is_active())


def gpt_layer_spec(num_experts: int | None, router_cls=None, use_te: bool | None = None,
                   te_attention: bool = True, norm: str = "rmsnorm",
                   grouped_gemm: bool | None = None) -> ModuleSpec:
    """The transformer layer spec for a GPT-style model, dense or MoE (``norm``: a NORMS key).

    ``te_attention=False`` keeps TE's fused linear layers but runs our SDPA core attention: TE has
    no fp32 attention backend for packed (THD) sequences (its unfused backend refuses THD, flash
    and fused need bf16/fp16), and fp32 runs (parity checks, small configs) still pack.
    """
    if use_te is None:
        use_te = te_available()
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=bool(num_experts))
        if not te_attention:
            spec.submodules.self_attention.submodules.core_attention = SDPAttention
    else:
        mcore_name, norm_cls = NORMS[norm]
        spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization=mcore_name)
        subs = spec.submodules
        subs.input_layernorm = norm_cls
        subs.pre_mlp_layernorm = norm_cls
        subs.self_attention.submodules.core_attention = SDPAttention
        if num_experts:
            # TE's MoE layer keeps a separate pre-MLP norm (checkpoint key pre_mlp_layernorm.*);
            # the local spec would file it under the dense fused name mlp.linear_fc1.layer_norm_*,
            # and checkpoints would not move between the two specs.
            subs.sharded_state_dict_keys_map = {
                k: v for k, v in subs.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."}
        if num_experts and grouped_gemm:
            experts = spec.submodules.mlp.keywords["submodules"].experts
            spec.submodules.mlp = _with_moe(spec.submodules.mlp, experts=functools.partial(
                GroupedGemmMLP, *experts.args, **experts.keywords))
    if num_experts and router_cls is not None:
        spec.submodules.mlp = _with_moe(spec.submodules.mlp, router=router_cls)
    return spec


def final_norm(use_te: bool | None = None, norm: str = "rmsnorm"):
    """The norm after the last layer. TransformerBlock would otherwise pick WrappedTorchNorm
    (no sequence parallel) on the local path."""
    if use_te if use_te is not None else te_available():
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return NORMS[norm][1]
