"""Tiny random HF checkpoints built with transformers classes (the reference side of the tests)."""
from __future__ import annotations

import os

import torch

from megatron_tanuki.models.tanuki.hf import load_remote_code_classes

VOCAB = 65024
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
              rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def dense_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(intermediate_size=160, **COMMON)).eval()


def moe_model(seed: int = 0, experts: int = 4):
    TanukiConfig, TanukiForCausalLM = load_remote_code_classes()
    torch.manual_seed(seed)
    cfg = TanukiConfig(intermediate_size=96, num_local_experts=experts, num_experts_per_tok=2,
                       router_aux_loss_coef=0.001, **COMMON)
    return TanukiForCausalLM(cfg).eval()


def save(model, path: str, dtype=torch.bfloat16, max_shard_size: str | None = None) -> str:
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        f.write('{"tokenizer_class": "LlamaTokenizer"}\n')
    return path
