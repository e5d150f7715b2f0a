"""Batched greedy decoding with megatron-core's forward-only schedule, under any TP/PP/EP layout.

Every step runs the whole sequence again (no KV cache yet: the demo's sequences are ~80 tokens),
but a Tanuki-vision tower runs once per group of prompts, not once per token;
the last pipeline stage picks the next tokens and every rank receives them, so all ranks advance
together. Prompts of different lengths are decoded in groups of equal length.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron_tanuki.inference.logits import device, forward_logits


def _source_rank() -> int:
    """Global rank of the first last-stage, TP-rank-0 process (it holds the full logits)."""
    from megatron.core import parallel_state

    mine = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
        parallel_state.get_tensor_model_parallel_rank() == 0
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, mine)
    return flags.index(True)


def greedy(chunks, prompts: list[list[int]], images: torch.Tensor | None, max_new_tokens: int, eos_id: int,
           vocab_size: int, images_per_prompt: int = 1, batch_size: int = 32) -> list[list[int]]:
    """``prompts``: token ids with image positions already expanded. Returns the new tokens of each."""
    for c in chunks:
        c.eval()
    src = _source_rank()
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    groups, cur = [], []
    for i in order:
        if cur and (len(prompts[i]) != len(prompts[cur[0]]) or len(cur) == batch_size):
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    for group in groups:
        ids = torch.tensor([prompts[i] for i in group])
        imgs = None
        if images is not None:  # on the device once, so every step passes the same tensor
            imgs = torch.cat([images[i * images_per_prompt:(i + 1) * images_per_prompt] for i in group]).to(device())
        done = torch.zeros(len(group), dtype=torch.bool)
        with contextlib.ExitStack() as stack:
            for c in chunks:  # Tanuki-vision: the frozen tower runs once per group, not per token
                if hasattr(c, "reusing_image_features"):
                    stack.enter_context(c.reusing_image_features())
            _decode(chunks, ids, imgs, group, out, done, max_new_tokens, eos_id, vocab_size, src)
    return out


def _decode(chunks, ids, imgs, group, out, done, max_new_tokens, eos_id, vocab_size, src) -> None:
    """Greedy steps for one group of equal-length prompts (every rank, in lockstep)."""
    for _ in range(max_new_tokens):
        logits = forward_logits(chunks, ids, images=imgs, last_only=True)
        nxt = [logits[:, :vocab_size].argmax(-1) if logits is not None else None]
        dist.broadcast_object_list(nxt, src=src)
        tok = nxt[0]
        tok = torch.where(done, torch.full_like(tok, eos_id), tok)
        for k, i in enumerate(group):
            if not done[k]:
                out[i].append(int(tok[k]))
        done |= tok == eos_id
        ids = torch.cat([ids, tok.unsqueeze(1)], dim=1)
        if bool(done.all()):
            break
