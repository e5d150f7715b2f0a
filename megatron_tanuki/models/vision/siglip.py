"""SigLIP-so400m as a megatron-core vision tower, cut where LLaVA-JP reads its features.

LLaVA-JP uses ``hidden_states[-2]`` of SigLIP: the output of the second-to-last encoder layer,
before the post LayerNorm. So the tower builds ``num_layers - 1`` layers (the last one is never
computed) and no post LayerNorm; then drops token 0 (``[:, 1:]``, although SigLIP has no CLS
token: their weights were trained on 728 tokens, so we keep the arithmetic). megatron-core's
CLIPViTModel (subtype "siglip") supplies the patch convolution, position embeddings and blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_tanuki.models.common.norm import TanukiLayerNorm
from megatron_tanuki.models.common.sdpa_attention import SDPAttention


@dataclass(frozen=True)
class SiglipConfig:
    name: str = "siglip-so400m-patch14-384"
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    ffn_hidden_size: int = 4304
    patch_size: int = 14
    image_size: int = 384
    norm_eps: float = 1e-6
    select_layer: int = -2  # index into HF hidden_states (embeddings, layer 1, ..., layer N)
    drop_first_token: bool = True  # LLaVA-JP "patch" selection: [:, 1:]

    @property
    def layers_to_build(self) -> int:
        return self.num_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_features(self) -> int:
        return self.num_patches - (1 if self.drop_first_token else 0)

    def replace(self, **kw) -> "SiglipConfig":
        return replace(self, **kw)


    def parameter_count(self) -> int:
        """Parameters of the tower as built (the unused last layer and post LayerNorm excluded)."""
        h, f, p = self.hidden_size, self.ffn_hidden_size, self.patch_size
        embeddings = 3 * p * p * h + h + self.num_patches * h
        layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
        return embeddings + layer * self.layers_to_build


SIGLIP_SO400M = SiglipConfig()
SIGLIP_TINY = SiglipConfig(name="siglip-tiny", hidden_size=32, num_layers=3, num_heads=4,
                           ffn_hidden_size=64, image_size=56)


def transformer_config(cfg: SiglipConfig, layout, dtype: torch.dtype = torch.float32) -> TransformerConfig:
    from megatron_tanuki.runtime import cpu

    return TransformerConfig(
        num_layers=cfg.layers_to_build, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
        ffn_hidden_size=cfg.ffn_hidden_size, kv_channels=cfg.hidden_size // cfg.num_heads,
        add_bias_linear=True, add_qkv_bias=True, gated_linear_unit=False,
        activation_func=partial(F.gelu, approximate="tanh"), normalization="LayerNorm",
        layernorm_epsilon=cfg.norm_eps, hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
        use_cpu_initialization=cpu.is_active() or not cpu.gpu_present(),
        # TP for the tower, never sequence parallel: its 729-token tiles are not scattered.
        tensor_model_parallel_size=layout.tp, sequence_parallel=False,
    )


def layer_spec() -> ModuleSpec:
    """A pre-norm ViT layer from megatron-core's local modules, SDPA attention without a mask."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=TanukiLayerNorm,
            self_attention=ModuleSpec(
                module=SelfAttention, params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=SDPAttention,
                    linear_proj=RowParallelLinear, q_layernorm=IdentityOp, k_layernorm=IdentityOp)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=TanukiLayerNorm,
            mlp=partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


class SiglipTower(CLIPViTModel):
    """Pixels [b, 3, H, W] (already normalized) -> features [b, num_features, hidden]."""

    def __init__(self, cfg: SiglipConfig, tcfg: TransformerConfig):
        block = TransformerBlockSubmodules(layer_specs=[layer_spec()] * cfg.layers_to_build, layer_norm=None)
        # 384 px is not a multiple of 14: the patch convolution floors to 27 x 27 (as in HF);
        # megatron-core asserts divisibility, so it is told the covered size, 27 * 14 = 378.
        covered = (cfg.image_size // cfg.patch_size) * cfg.patch_size
        super().__init__(tcfg, block, ln_post_impl=TanukiLayerNorm, add_class_token=False, class_token_len=0,
                         patch_dim=cfg.patch_size, img_h=covered, img_w=covered, model_subtype="siglip")
        self.ln_post = None  # LLaVA-JP reads features before the post LayerNorm
        self.conv1.to(tcfg.params_dtype)  # megatron builds the patch conv in the default dtype
        self.vision_cfg = cfg

    def forward(self, pixels: torch.Tensor, attention_mask=None) -> torch.Tensor:
        x = super().forward(pixels, attention_mask)
        return x[:, 1:] if self.vision_cfg.drop_first_token else x
