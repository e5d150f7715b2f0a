"""Inference on megatron-core models (the server and batched generation grow here)."""
