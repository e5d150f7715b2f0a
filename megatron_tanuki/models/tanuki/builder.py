"""Build Tanuki (dense or MoE) -- and any GPT-style config -- as megatron-core GPTModel chunks.

The architecture-specific choices come from the config as data (``activation``, ``normalization``,
``rotary_percent``, ``reward_outputs``; Nemotron-4's config carries other values), never from a
test of its type, so Nemotron-4 builds here too.

Pure model construction: process groups must already exist (runtime.distributed). Parallelism is
read from megatron-core's parallel_state, the layout only sets the config flags that go with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.activations import squared_relu
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_tanuki.models import specs
from megatron_tanuki.models.tanuki.config import TanukiConfig
from megatron_tanuki.models.tanuki.router import TanukiRouter
from megatron_tanuki.runtime import cpu
from megatron_tanuki.runtime.distributed import ParallelLayout

FP8_FORMATS = ("e4m3", "hybrid")
# A config's ``activation`` -> megatron-core MLP settings (squared ReLU: Nemotron-4's ungated MLP).
ACTIVATIONS = {"swiglu": dict(gated_linear_unit=True, activation_func=F.silu),
               "squared_relu": dict(gated_linear_unit=False, activation_func=squared_relu)}
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")



@dataclass(frozen=True)
class BuildOptions:
    """How to build (not what): precision, FP8, recompute, initialization."""

    dtype: str = "fp32"  # fp32 | bf16 | fp16
    fp8: str | None = None  # e4m3 | hybrid (needs Transformer Engine)
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_param: bool = False  # keep the weights in FP8 (TE fp8_model_init): serving a model that fits only so
    recompute_granularity: str | None = None  # None | selective | full
    recompute_num_layers: int | None = None  # for full recompute
    init_method_std: float = 0.02
    perform_initialization: bool = True
    use_te: bool | None = None  # None: TE when available
    moe_aux_loss_coeff: float | None = None  # None: the preset's
    moe_token_dispatcher: str = "alltoall"
    # Experts as grouped GEMMs (TE's, or ours without TE) vs one GEMM per expert (SequentialMLP);
    # None: grouped on a GPU, sequential on CPU. The checkpoint keys are the same either way.
    moe_grouped_gemm: bool | None = None

    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def validate(self, use_te: bool) -> None:
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if self.fp8 is not None:
            if self.fp8 not in FP8_FORMATS:
                raise ValueError(f"fp8 must be one of {FP8_FORMATS}, got {self.fp8!r}")
            if self.fp8_recipe not in FP8_RECIPES:
                raise ValueError(f"fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
            if not use_te:
                raise ValueError("FP8 needs Transformer Engine on a GPU (pip install megatron_tanuki[te])")
        if self.fp8_param and self.fp8 is None:
            raise ValueError("fp8_param (FP8 weights) needs fp8 (e4m3 or hybrid)")


def grouped_gemm(opts: BuildOptions, use_te: bool) -> bool:
    return specs.grouped_gemm_default(use_te) if opts.moe_grouped_gemm is None else opts.moe_grouped_gemm


def transformer_config(cfg: TanukiConfig, layout: ParallelLayout, opts: BuildOptions,
                       use_te: bool) -> TransformerConfig:
    dtype = opts.torch_dtype()
    moe = {}
    if cfg.is_moe:
        moe = dict(
            num_moe_experts=cfg.num_experts,
            moe_ffn_hidden_size=cfg.ffn_hidden_size,
            moe_router_topk=cfg.moe_topk,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff if opts.moe_aux_loss_coeff is None
            else opts.moe_aux_loss_coeff,
            moe_router_dtype="fp32",
            moe_token_dispatcher_type=opts.moe_token_dispatcher,
            moe_grouped_gemm=use_te and grouped_gemm(opts, use_te),  # megatron's flag: TE's grouped MLP
            moe_router_pre_softmax=False,
        )
    fp8 = {}
    if opts.fp8:
        fp8 = dict(fp8=opts.fp8, fp8_recipe=opts.fp8_recipe,
                   fp8_amax_history_len=opts.fp8_amax_history_len, fp8_amax_compute_algo="max",
                   fp8_param=opts.fp8_param)
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_hidden_size,
        **ACTIVATIONS[cfg.activation],
        normalization=specs.NORMS[cfg.normalization][0],
        layernorm_zero_centered_gamma=cfg.normalization == "layernorm1p",
        layernorm_epsilon=cfg.norm_eps,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=opts.init_method_std,
        perform_initialization=opts.perform_initialization,
        use_cpu_initialization=cpu.is_active() or not cpu.gpu_present(),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        **layout.mcore_sizes(),
        # Interleaved schedule: with PP=2 the next and previous stage are one rank, and batched p2p
        # cannot tell an activation from a gradient sent to it (Megatron-LM #750: same shapes, so
        # they swap silently); Megatron-LM turns p2p overlap on for VPP, which keeps them apart.
        overlap_p2p_comm=bool(layout.vpp), batch_p2p_comm=not layout.vpp,
        sequence_parallel=layout.sp,
        # Fusions that need apex/TE kernels are on only with TE.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=use_te,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        recompute_granularity=opts.recompute_granularity,
        recompute_method="uniform" if opts.recompute_granularity == "full" else None,
        recompute_num_layers=(opts.recompute_num_layers or 1)
        if opts.recompute_granularity == "full" else None,
        **moe,
        **fp8,
    )


def build_model(cfg: TanukiConfig, layout: ParallelLayout, opts: BuildOptions | None = None,
                device: str | torch.device | None = None) -> list[GPTModel]:
    """Model chunks for this rank: one, or ``vpp`` for the interleaved pipeline schedule.

    ``device="meta"`` builds shapes only (no memory), as ``tanuki model-info`` does.
    """
    opts = opts or BuildOptions()
    use_te = specs.te_available() if opts.use_te is None else opts.use_te
    if device == "meta" and opts.use_te is None:
        use_te = False  # shapes/keys only: the local spec, whose names the conversion tables use
    opts.validate(use_te)
    tcfg = transformer_config(cfg, layout, opts, use_te)
    if device == "meta":
        # An explicit device=cuda in megatron's layers would beat the meta context on GPU nodes.
        tcfg.perform_initialization = False
        tcfg.use_cpu_initialization = True
    layer_spec = specs.gpt_layer_spec(cfg.num_experts, TanukiRouter if cfg.router_standardize else None,
                                      use_te=use_te, te_attention=opts.dtype != "fp32", norm=cfg.normalization,
                                      grouped_gemm=grouped_gemm(opts, use_te))
    final_norm = specs.final_norm(use_te, cfg.normalization)
    model_cls = RewardGPTModel if cfg.reward_outputs else GPTModel

    chunks = []
    for vp_stage in (range(layout.vpp) if layout.vpp else [None]):
        block = TransformerBlockSubmodules(
            layer_specs=[layer_spec] * get_num_layers_to_build(tcfg, vp_stage=vp_stage),
            layer_norm=final_norm)
        with target_device(device):
            model = model_cls(
                config=tcfg,
                transformer_layer_spec=block,
                vocab_size=cfg.vocab_size,
                max_sequence_length=cfg.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                share_embeddings_and_output_weights=cfg.tie_embeddings,
                position_embedding_type="rope",
                rotary_base=cfg.rope_theta,
                rotary_percent=cfg.rotary_percent,
                vp_stage=vp_stage,
                **({"reward_outputs": cfg.reward_outputs} if cfg.reward_outputs else {}),
            )
        chunks.append(place(model, device))
    return chunks


class RewardGPTModel(GPTModel):
    """A GPT trunk whose last stage ends in ``rm_head`` (NeMo-Aligner's reward model layout).

    The head is a RowParallelLinear [outputs, hidden] with bias, as NeMo-Aligner's RewardModelHead, so its
    checkpoint key and TP split (``rm_head.weight`` along hidden) match the released Nemotron-4-340B-Reward.
    The forward returns the head's outputs for every token, [batch, seq, outputs], in place of logits,
    so the same pipeline/TP forward that yields logits yields rewards; the scorer reads each sequence's
    last token. ``output_layer`` stays (the released checkpoint holds it) but is not run.
    """

    def __init__(self, *args, reward_outputs: int, **kwargs):
        super().__init__(*args, **kwargs)
        if self.post_process:
            from megatron.core.tensor_parallel.layers import RowParallelLinear

            self.rm_head = RowParallelLinear(
                self.config.hidden_size, reward_outputs, config=self.config, init_method=self.config.init_method,
                bias=True, input_is_parallel=False, skip_bias_add=False)

    def _postprocess(self, hidden_states, *args, **kwargs):
        if not self.post_process:
            return hidden_states
        if self.config.sequence_parallel:
            raise ValueError("the reward head does not run under sequence parallelism")
        scores, _ = self.rm_head(hidden_states)
        return scores.transpose(0, 1).contiguous()


def target_device(device: str | torch.device | None = None) -> torch.device:
    """Where a rank's model lives: ``device`` when given (``meta`` for shapes, or a stand-in in
    tests), else this rank's GPU, else the CPU. Builders build under it *and* move the finished
    module to it, because megatron-core creates some buffers on an explicit device (RoPE
    ``inv_freq`` on ``torch.cuda.current_device()``) and vision parts are built outside GPTModel."""
    return torch.device(device) if device is not None else rank_device()


def rank_device() -> torch.device:
    """This rank's accelerator (set by runtime.distributed), or the CPU without one. Tests replace
    it with ``meta`` to run the GPU branch -- ``device=None`` -- on a CPU machine."""
    if cpu.is_active() or not cpu.gpu_present():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def place(module: torch.nn.Module, device: str | torch.device | None = None) -> torch.nn.Module:
    """Every parameter and buffer of ``module`` onto :func:`target_device` (the GPU branch of a
    real run; tests run it with ``meta`` as the stand-in device)."""
    return module.to(target_device(device))


def count_parameters(chunks, cfg: TanukiConfig) -> dict:
    """Total and per-token active parameters of the built (local) model chunks.

    Active = total minus the experts a token does not visit: (E - k) / E of the expert weights.
    Expert parameters are those under a MoE layer's ``experts`` module (megatron-core's
    ``allreduce=False`` tag is set only when experts use their own process groups).
    """
    total = expert = 0
    for model in chunks:
        for name, p in model.named_parameters():
            total += p.numel()
            if ".mlp.experts." in name:
                expert += p.numel()
    active = total
    if cfg.is_moe:
        active = total - expert * (cfg.num_experts - cfg.moe_topk) // cfg.num_experts
    return {"total": total, "active": active, "experts": expert, "non_expert": total - expert}
