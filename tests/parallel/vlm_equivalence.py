"""Rank side of the Tanuki-vision layout test: one-rank logits vs TP=2 (SP for the MoE) and PP=2.

Reference weights are saved with dist_checkpointing from the one-rank model and loaded into the
layout (vision tower and projector live on pipeline stage 0). Forward only: the tower is frozen.
"""
from __future__ import annotations

import shutil
import tempfile

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from megatron_tanuki.models.registry import get_preset
from megatron_tanuki.models.tanuki.builder import BuildOptions
from megatron_tanuki.models.tanuki_vision.builder import build_vlm
from megatron_tanuki.models.tanuki_vision.model import IMAGE_TOKEN_ID, expand_image_tokens
from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed, setup_model_parallel


def _inputs(cfg):
    # 22 tokens: sequence parallel needs the length divisible by TP
    a, _ = expand_image_tokens([1, 500, IMAGE_TOKEN_ID, 600, 700, 800, 900, 950], None, cfg.num_image_tokens)
    b, _ = expand_image_tokens([1, IMAGE_TOKEN_ID, 901, 902, 903, 904, 905, 906], None, cfg.num_image_tokens)
    ids = torch.tensor([a, b])
    g = torch.Generator().manual_seed(5)
    side = cfg.vision.image_size * 2
    images = torch.rand(2, 3, side, side, generator=g) * 2 - 1
    return ids, images


def _logits(chunks, ids, images):
    pos = torch.arange(ids.shape[1]).expand_as(ids)

    def step(data_iterator, model):
        next(data_iterator)
        out = model(ids, pos, None, images=images)
        return out, lambda t, non_loss_data=False: gather_from_tensor_model_parallel_region(t)

    its = [iter([None]) for _ in chunks]
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=its if len(chunks) > 1 else its[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1, seq_length=ids.shape[1],
            micro_batch_size=ids.shape[0], forward_only=True, collect_non_loss_data=True)
    out = store[0].float() if store else torch.zeros(0)
    box = [out if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
           else None] * 1
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, box[0])
    return next(x for x in gathered if x is not None)


def _sharded(chunks):
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def run(preset: str, layouts: dict) -> dict:
    cfg = get_preset(preset)
    opts = BuildOptions(dtype="fp32")
    init_distributed(ParallelLayout(), cfg.llm, seed=0)
    ids, images = _inputs(cfg)
    tmp = [tempfile.mkdtemp(prefix="tanuki-vlm-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    ref = build_vlm(cfg, ParallelLayout(), opts)
    with torch.no_grad():
        for p in ref[0].parameters():
            dist.broadcast(p, src=0)
    for c in ref:
        c.eval()
    dist_checkpointing.save(_sharded(ref), tmp)
    ref_logits = _logits(ref, ids, images)
    results = {}
    for name, lay in layouts.items():
        layout = ParallelLayout(**lay)
        setup_model_parallel(layout, seed=1)
        chunks = build_vlm(cfg, layout, opts)
        state = dist_checkpointing.load(_sharded(chunks), tmp)
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"chunk{i}"], strict=True)
            c.eval()
        got = _logits(chunks, ids, images)
        results[name] = {"max_abs_diff": (got - ref_logits).abs().max().item(),
                         "top1_equal": bool(torch.equal(got.argmax(-1), ref_logits.argmax(-1))),
                         "shape": tuple(got.shape)}
        setup_model_parallel(ParallelLayout(), seed=0)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return results
