"""Tanuki-8x8B configuration: Mixtral's fields under model_type "tanuki".

Shipped with every exported Tanuki-8x8B folder (trust_remote_code). The released config carries a
stray ``num_experts_per_topk`` field; it is accepted and kept as-is.
"""
from transformers import MixtralConfig


class TanukiConfig(MixtralConfig):
    model_type = "tanuki"

    def __init__(self, router_standardize_eps: float = 1e-5, **kwargs):
        self.router_standardize_eps = router_standardize_eps
        super().__init__(**kwargs)
