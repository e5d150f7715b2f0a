"""The attention kernel of megatron-core's dynamic inference path, chosen once per process.

Why this module exists: megatron-core 0.19's dynamic engine never calls the layer spec's core
attention. ``Attention.forward`` asserts flash-attn (FA2 >= 2.7.3, FA3 or FA4) and then calls
``Attention.flash_decode_and_prefill(q, k, v, ...)`` with the paged KV cache. flash-attn has no
binary wheel for our GPUs, so without it the engine cannot run at all. We install one of:

* ``flash-attn``  -- installed: megatron-core's own kernels, nothing replaced;
* ``torch-varlen`` -- CUDA without flash-attn: ``torch.nn.attention.varlen.varlen_attn``
  (PyTorch's bundled FA2/cuDNN), which takes the same paged cache, block table and lengths;
* ``paged-sdpa``  -- otherwise (CPU): the pages of each request gathered into one padded batch and
  one ``scaled_dot_product_attention`` with a bottom-right causal + length mask. Exact.

The arguments, as megatron-core passes them: ``q`` ``[T, 1, H, D]`` (rotated; ``T`` padded tokens),
``k``/``v`` the layer's cache ``[blocks, block_size, G, D]`` already holding this step's keys,
int32 ``cu_seqlens_q`` ``[R+1]``, ``seqlens_k`` ``[R]`` (padded requests: 0), ``block_table``
``[R, max_blocks]`` (unused entries -1). Query ``i`` of a request with ``lq`` queries and ``lk``
keys sits at position ``lk - lq + i`` and sees keys ``0..lk-lq+i``.

:func:`install` is idempotent and prints the choice once. ``einops`` is optional in megatron-core
but its dynamic path calls ``rearrange`` on the attention output; without einops we install the
one reshape it needs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CHOSEN: str | None = None
_FA_VERSION_CHECK = None   # megatron's own is_fa_min_version, kept when install() replaces it


def flash_attn_installed() -> bool:
    from megatron.core.transformer import attention

    check = _FA_VERSION_CHECK or attention.is_fa_min_version  # never the gate install() opened
    try:
        return bool(attention.HAVE_FA4 or attention.HAVE_FA3 or check("2.7.3"))
    except Exception:  # no flash_attn distribution at all
        return False


def choose() -> str:
    """The backend this process would use (without installing it)."""
    if flash_attn_installed():
        return "flash-attn"
    if torch.cuda.is_available():
        return "torch-varlen"
    return "paged-sdpa"


def chosen() -> str | None:
    return _CHOSEN


def install(verbose: bool = True) -> str:
    """Make ``Attention.flash_decode_and_prefill`` run on this machine; returns the backend name."""
    global _CHOSEN, _FA_VERSION_CHECK
    if _CHOSEN is not None:
        return _CHOSEN
    from megatron.core.transformer import attention

    name = choose()
    for attr in ("is_fa_min_version", "rearrange"):
        if not hasattr(attention, attr):
            raise RuntimeError(f"megatron.core.transformer.attention.{attr} is gone in this megatron-core; "
                               "update megatron_tanuki/inference/attention_backend.py")
    if not hasattr(attention.Attention, "flash_decode_and_prefill"):
        raise RuntimeError("megatron.core.transformer.attention.Attention.flash_decode_and_prefill is gone "
                           "in this megatron-core; update megatron_tanuki/inference/attention_backend.py")
    if attention.rearrange is None:
        attention.rearrange = _rearrange_merge_heads
    if name != "flash-attn":
        kernel = _torch_varlen if name == "torch-varlen" else paged_sdpa
        # the dynamic path's flash-attn version gate (attention.py: Attention.forward)
        _FA_VERSION_CHECK = attention.is_fa_min_version
        attention.is_fa_min_version = lambda *a, **k: True
        attention.Attention.flash_decode_and_prefill = _method(kernel)
    _CHOSEN = name
    if verbose:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"[tanuki] inference attention backend: {name}", flush=True)
    return name


def _rearrange_merge_heads(tensor, pattern: str):
    if pattern.replace(" ", "") != "sbhd->sb(hd)":
        raise NotImplementedError(f"rearrange({pattern!r}) without einops")
    return tensor.reshape(tensor.shape[0], tensor.shape[1], -1)


def _method(kernel):
    def flash_decode_and_prefill(self, q, k, v, max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k,
                                 seqlens_k, block_table, is_decode_only, softmax_offset=None):
        if softmax_offset is not None:
            raise NotImplementedError("attention sinks (softmax_offset) are not supported by the "
                                      f"{_CHOSEN} inference backend")
        if getattr(self.config, "window_size", None) is not None:
            raise NotImplementedError("sliding-window attention is not supported by the "
                                      f"{_CHOSEN} inference backend")
        scale = getattr(self, "softmax_scale", None) or q.shape[-1] ** -0.5
        return kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, seqlens_k, block_table, scale,
                      int(max_seqlen_q), int(max_seqlen_k))
    flash_decode_and_prefill.__doc__ = f"megatron_tanuki: {kernel.__name__} (inference/attention_backend.py)"
    return flash_decode_and_prefill


def paged_sdpa(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, seqlens_k, block_table, scale,
               max_seqlen_q=None, max_seqlen_k=None) -> torch.Tensor:
    """Paged attention as one padded SDPA. Returns ``[T, 1, H, D]``; padding rows are zero."""
    tokens, heads, dim = q.shape[0], q.shape[-2], q.shape[-1]
    q = q.reshape(tokens, heads, dim)
    out = torch.zeros_like(q)
    cu_q = cu_seqlens_q.long()
    q_lens = cu_q[1:] - cu_q[:-1]
    k_lens = seqlens_k.long()[: q_lens.numel()]
    live = (k_lens > 0).nonzero().flatten()
    if live.numel() == 0:
        return out.unsqueeze(1)
    q_lens, k_lens, starts = q_lens[live], k_lens[live], cu_q[:-1][live]
    max_q, max_k = int(q_lens.max()), int(k_lens.max())
    block = k_cache.shape[1]
    pages = block_table[live, : math.ceil(max_k / block)].long().clamp_min(0)
    # Whole pages are gathered; slots past a request's length were never written (torch.empty: NaN is
    # possible) and would poison the masked softmax (0 * NaN), so they are zeroed.
    written = (torch.arange(max_k, device=q.device) < k_lens[:, None])[:, :, None, None]
    keys = k_cache[pages].flatten(1, 2)[:, :max_k].masked_fill(~written, 0)      # [R, max_k, G, D]
    values = v_cache[pages].flatten(1, 2)[:, :max_k].masked_fill(~written, 0)
    step = torch.arange(max_q, device=q.device)
    rows = starts[:, None] + step                          # [R, max_q] token index of each query
    real = step < q_lens[:, None]
    rows = torch.where(real, rows, torch.zeros_like(rows))
    position = k_lens[:, None] - q_lens[:, None] + step   # absolute position of each query
    mask = torch.arange(max_k, device=q.device) <= position[:, :, None]   # [R, max_q, max_k]
    ctx = F.scaled_dot_product_attention(
        q[rows].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask[:, None], scale=scale, enable_gqa=keys.shape[2] != heads)
    out[rows[real]] = ctx.transpose(1, 2)[real].to(out.dtype)
    return out.unsqueeze(1)


def varlen_supports(q, k_cache) -> bool:
    """What PyTorch's bundled FA2 accepts: CUDA, fp16/bf16, pages a multiple of 256 tokens, head
    dim a multiple of 8 up to 256. Anything else (an fp32 parity run, 64-token test pages) takes the
    paged SDPA, which is exact on any device."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k_cache.shape[1] % 256 == 0
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


_FELL_BACK = False


def _torch_varlen(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, seqlens_k, block_table, scale,
                  max_seqlen_q, max_seqlen_k) -> torch.Tensor:
    """PyTorch's bundled flash attention over the paged cache (CUDA only; unproven without a GPU).
    Rows past ``cu_seqlens_q[-1]`` (padding) are zero, as in the paged SDPA."""
    global _FELL_BACK
    if not varlen_supports(q, k_cache):
        if not _FELL_BACK:
            _FELL_BACK = True
            print(f"[tanuki] inference attention: {q.dtype}, {k_cache.shape[1]}-token pages, head dim "
                  f"{q.shape[-1]} -> paged-sdpa (torch varlen_attn needs fp16/bf16 and 256-token pages)", flush=True)
        return paged_sdpa(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, seqlens_k, block_table, scale)
    from torch.nn.attention.varlen import varlen_attn_out

    q3 = q.reshape(q.shape[0], q.shape[-2], q.shape[-1])
    out = torch.zeros_like(q3)
    varlen_attn_out(out, q3, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    scale=scale, window_size=(-1, 0), enable_gqa=k_cache.shape[-2] != q.shape[-2],
                    seqused_k=seqlens_k, block_table=block_table)
    return out.unsqueeze(1)
