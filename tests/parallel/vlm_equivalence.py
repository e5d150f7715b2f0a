"""Rank side of the Tanuki-vision layout tests: one rank vs TP=2 (+SP), PP=2 and EP=2.

Reference weights are saved with dist_checkpointing from the one-rank model and loaded into the
layout (vision tower and projector live on pipeline stage 0). Forward: full-vocabulary logits
through inference.logits. Backward (stage-2 training: projector + LLM trainable, tower frozen):
every trainable gradient, brought back to the one-rank shape as in equivalence.py, and the loss.
As there, the reference runs the whole global batch on every rank, and a layout with DP=2 (EP=2:
the non-expert parameters are data parallel) gives each rank its own micro-batch, with different
loss-token counts.
"""
from __future__ import annotations

import shutil

import torch
import torch.distributed as dist

from megatron_tanuki.data.templates import IMAGE_TOKEN_ID, expand_image_tokens
from megatron_tanuki.inference.logits import forward_logits
from megatron_tanuki.models.registry import get_preset
from megatron_tanuki.models.tanuki.builder import BuildOptions
from megatron_tanuki.models.tanuki_vision.builder import build_vlm
from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed, setup_model_parallel
from megatron_tanuki.train.step import Batch, forward_backward, wrap_ddp
from tests.parallel.equivalence import (dp_share, layout_gradients, load, save, shared_tmpdir,
                                        trainable_grads)

# text around one <image> per row; expanded (tiny presets: 15 image tokens) each row is 23 ids, 22
# inputs: sequence parallelism needs the length divisible by TP
ROWS = [[1, 500, IMAGE_TOKEN_ID, 600, 700, 800, 900, 950, 960],
        [1, IMAGE_TOKEN_ID, 901, 902, 903, 904, 905, 906, 907],
        [1, 610, 620, IMAGE_TOKEN_ID, 630, 640, 650, 660, 670],
        [1, IMAGE_TOKEN_ID, 710, 720, 730, 740, 750, 760, 770]]
LOST_TEXT_TOKENS = [5, 0, 0, 0]  # loss-masked text at the end of each row: micro-batch 0 counts fewer


def _images(cfg, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1


def _inputs(cfg):
    """Forward-test input: the first two rows, their inputs only."""
    ids = torch.tensor([expand_image_tokens(r, None, cfg.num_image_tokens)[0][:-1] for r in ROWS[:2]])
    return ids, _images(cfg, 2, 5)


def _batches(cfg) -> list[Batch]:
    """Two micro-batches of two rows (one image each); labels at image positions count no loss."""
    out = []
    for m in range(2):
        rows = ROWS[2 * m:2 * m + 2]
        ids = torch.tensor([expand_image_tokens(r, None, cfg.num_image_tokens)[0] for r in rows])
        batch = Batch.causal_lm(ids)
        batch.loss_mask = (batch.labels != IMAGE_TOKEN_ID).float()
        batch.labels = batch.labels.clamp(min=0)
        for r in range(2):
            if LOST_TEXT_TOKENS[2 * m + r]:
                batch.loss_mask[r, -LOST_TEXT_TOKENS[2 * m + r]:] = 0
        batch.images = _images(cfg, 2, 10 + m)
        out.append(batch)
    return out


def _logits(chunks, ids, images) -> torch.Tensor:
    """Logits on every rank: the last pipeline stage's, shared with all ranks."""
    got = forward_logits(chunks, ids, images=images)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, got)
    return next(x for x in gathered if x is not None)


def _train(chunks, batches):
    for c in chunks:
        c.set_trainable(projector=True, language_model=True)  # stage 2
    ddp = wrap_ddp(chunks)
    return ddp, forward_backward(ddp, batches, batches[0].tokens.shape[1], batches[0].tokens.shape[0])


def run(preset: str, layouts: dict, backward_layouts: dict | None = None) -> dict:
    """``layouts``: forward (logits) comparison; ``backward_layouts``: loss and gradients."""
    cfg = get_preset(preset)
    opts = BuildOptions(dtype="fp32")
    init_distributed(ParallelLayout(), cfg.llm, seed=0)
    ids, images = _inputs(cfg)
    batches = _batches(cfg)
    tmp = shared_tmpdir("tanuki-vlm-")

    def build(layout):
        return build_vlm(cfg, layout, opts)

    ref = build(ParallelLayout())
    with torch.no_grad():
        for p in ref[0].parameters():
            dist.broadcast(p, src=0)
    save(ref, f"{tmp}/weights")
    for c in ref:
        c.eval()
    ref_logits = _logits(ref, ids, images)
    results = {}
    for name, lay in layouts.items():
        layout = ParallelLayout(**lay)
        setup_model_parallel(layout, seed=1)
        chunks = build(layout)
        load(chunks, f"{tmp}/weights", strict=True)
        for c in chunks:
            c.eval()
        got = _logits(chunks, ids, images)
        results[name] = {"max_abs_diff": (got - ref_logits).abs().max().item(),
                         "top1_equal": bool(torch.equal(got.argmax(-1), ref_logits.argmax(-1))),
                         "shape": tuple(got.shape)}
        setup_model_parallel(ParallelLayout(), seed=0)

    if backward_layouts:
        ref = build(ParallelLayout())
        load(ref, f"{tmp}/weights", strict=True)
        ref_ddp, ref_loss = _train(ref, batches)  # every rank: the whole global batch
        ref_grads = trainable_grads(ref_ddp[0])
        frozen = sorted(n for n, p in ref[0].named_parameters() if not p.requires_grad)
        for name, lay in backward_layouts.items():
            layout = ParallelLayout(**lay)
            layout.validate(dist.get_world_size(), cfg.llm)
            setup_model_parallel(layout, seed=1)
            chunks = build(layout)
            load(chunks, f"{tmp}/weights", strict=True)
            share = dp_share(batches)
            ddp, loss = _train(chunks, share)
            results[f"backward_{name}"] = {
                "ref_loss": ref_loss, "loss": loss,
                "num_frozen": len(frozen), "frozen_prefixes": sorted({n.split(".")[0] for n in frozen}),
                **layout_gradients(ddp, chunks, share, batches, build, f"{tmp}/grads-{name}", ref_grads)}
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return results
