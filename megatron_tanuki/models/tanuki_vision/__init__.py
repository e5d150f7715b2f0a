"""Tanuki-vision: SigLIP (+S2) -> mlp2x_gelu projector -> Tanuki LLM, LLaVA style, on megatron-core."""
