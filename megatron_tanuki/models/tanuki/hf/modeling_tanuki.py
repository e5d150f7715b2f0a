"""Tanuki-8x8B for transformers: Mixtral with per-token standardized router logits.

The router computes ``logits = (logits - mean) / (std + eps)`` over the experts (unbiased std,
eps 1e-5) before Mixtral's softmax / top-k / renormalize; the standardized logits are also what
the load-balancing loss sees (they are the router's recorded output).

Checkpoints use the Mixtral v4 names (``block_sparse_moe.experts.{e}.w1|w2|w3``); transformers'
own Mixtral conversion (fused expert tensors in memory) is registered for model_type "tanuki".
Shipped with every exported Tanuki-8x8B folder; imports only torch and transformers.
"""
import torch
from transformers import MixtralForCausalLM, MixtralModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

try:
    from .configuration_tanuki import TanukiConfig
except ImportError:  # imported as a top-level module (tests, tools)
    from configuration_tanuki import TanukiConfig

register_checkpoint_conversion_mapping("tanuki", get_checkpoint_conversion_mapping("mixtral"), overwrite=True)


def standardize_router_logits(logits: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True, unbiased=True)
    return (logits - mean) / (std + eps)


class TanukiTopKRouter(MixtralTopKRouter):
    def __init__(self, config):
        super().__init__(config)
        self.eps = getattr(config, "router_standardize_eps", 1e-5)

    def forward(self, hidden_states):
        # As the released model: standardize in the model's dtype, softmax in fp32.
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        logits = standardize_router_logits(logits, self.eps)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return logits, top_value.to(hidden_states.dtype), top_index


def _use_tanuki_router(model: MixtralModel, config) -> None:
    for layer in model.layers:
        layer.mlp.gate = TanukiTopKRouter(config)


class TanukiModel(MixtralModel):
    config_class = TanukiConfig

    def __init__(self, config):
        super().__init__(config)
        _use_tanuki_router(self, config)
        self.post_init()


class TanukiForCausalLM(MixtralForCausalLM):
    config_class = TanukiConfig

    def __init__(self, config):
        super().__init__(config)
        _use_tanuki_router(self.model, config)
        self.post_init()
