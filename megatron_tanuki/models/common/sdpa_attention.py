"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Why: megatron-core's local ``DotProductAttention`` materializes the full score matrix; on one H100
(Tanuki-8x8B-shaped block, seq 4096, bf16) it ran at 229 TFLOPS against 386 with SDPA
(../shared/probes). SDPA picks flash / memory-efficient kernels on GPU and is exact on CPU. It is
GQA-aware (``enable_gqa``), so KV heads are never repeated in memory.

Masks follow megatron's convention: ``attention_mask`` True means *masked out*; on a causal layer a
given mask is combined with the causal one (as Transformer Engine does), never a replacement.

Packed samples come as megatron-core's ``PackedSeqParams`` (``qkv_format="thd"``, ``cu_seqlens``),
exactly what Transformer Engine gets on the cluster: q/k/v are ``[tokens, heads, dim]`` with RoPE
already restarted per sample by megatron-core, and each sample attends causally to itself only.
We run SDPA once per sample (exact; no ``[s, s]`` mask is ever built).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type=None, pg_collection=None, **_):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("SDPA core attention does not implement context parallelism; "
                             "use the Transformer Engine spec (pip install megatron_tanuki[te]) for CP > 1")
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            causal = (attn_mask_type or self.attn_mask_type) in (AttnMaskType.causal, AttnMaskType.padding_causal)
            return self._packed(query, key, value, packed_seq_params, causal)
        mask_type = attn_mask_type or self.attn_mask_type
        sq, b, heads, dim = query.shape
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if attention_mask is None:
            mask = None
        else:
            # A given mask (padding, packed documents) adds to causality, as in TE; never replaces it.
            mask = ~attention_mask
            if causal:
                sk = k.shape[2]
                mask = mask & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            causal = False
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=k.shape[1] != q.shape[1])
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)

    def _packed(self, query, key, value, params, causal: bool):
        """THD: ``[t, h, d]`` tensors, samples delimited by ``cu_seqlens``; returns ``[t, h*d]``."""
        if params.qkv_format != "thd":
            raise ValueError(f"packed sequences must use qkv_format='thd', got {params.qkv_format!r}")
        cu_q = params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None else params.cu_seqlens_q
        cu_k = params.cu_seqlens_kv_padded if params.cu_seqlens_kv_padded is not None else params.cu_seqlens_kv
        if not torch.equal(cu_q, cu_k):
            raise ValueError("packed self-attention needs cu_seqlens_q == cu_seqlens_kv")
        bounds = cu_q.tolist()
        if bounds[0] != 0 or bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens {bounds[0]}..{bounds[-1]} do not cover the {query.shape[0]} packed tokens")
        t, heads, dim = query.shape
        gqa = key.shape[1] != heads
        out = torch.empty_like(query)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b == a:
                continue
            # [L, h, d] -> [1, h, L, d]
            q, k, v = (x[a:b].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
            ctx = F.scaled_dot_product_attention(
                q, k, v, is_causal=causal, scale=self.softmax_scale,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=gqa)
            out[a:b] = ctx.squeeze(0).transpose(0, 1)
        return out.reshape(t, heads * dim)
