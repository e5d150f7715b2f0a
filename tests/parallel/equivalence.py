"""Rank-side code of the parallel-equivalence tests (run through runtime.spawn.run_ranks).

One reference run (TP=PP=EP=1, the same batch on every DP rank) and then each layout under test,
with the reference weights split into that layout by megatron-core's own dist_checkpointing
(saved from the reference model, loaded into the parallel one). Gradients go back the same way:
the parallel model's gradients are saved as if they were weights and loaded into a reference-
shaped model, so every parameter is compared element by element, whatever its sharding.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model
from megatron_tanuki.models.tanuki.config import PRESETS
from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed, setup_model_parallel
from megatron_tanuki.train.step import Batch, forward_backward, wrap_ddp

SEQ, MBS, MICROBATCHES = 16, 2, 2  # 2 micro-batches: gradient accumulation, and VPP needs M >= PP


def _batch(vocab: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (MBS, SEQ + 1), generator=g)
    return Batch.causal_lm(ids)


def _sharded(chunks):
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _save(chunks, path):
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded(chunks), path)


def _load(chunks, path):
    state = dist_checkpointing.load(_sharded(chunks), path)
    for i, c in enumerate(chunks):
        c.load_state_dict(state[f"chunk{i}"], strict=False)


def _grads_as_weights(ddp_chunks):
    """Put each parameter's accumulated gradient in place of its value (for saving)."""
    with torch.no_grad():
        for c in ddp_chunks:
            for p in c.module.parameters():
                p.copy_(p.main_grad)


def _full_params(path, cfg, opts):
    """Load a checkpoint into a single-rank-layout model and return name -> tensor."""
    setup_model_parallel(ParallelLayout())
    model = build_model(cfg, ParallelLayout(), opts)
    _load(model, path)
    return {n: p.detach().clone() for n, p in model[0].named_parameters()}


def run(preset: str, layouts: dict[str, dict], aux_loss_coeff: float = 0.01, seed: int = 0) -> dict:
    cfg = PRESETS[preset]
    opts = BuildOptions(dtype="fp32", moe_aux_loss_coeff=aux_loss_coeff if cfg.is_moe else None)
    init_distributed(ParallelLayout(), cfg, seed=seed)
    batches = [_batch(cfg.vocab_size, seed + i) for i in range(MICROBATCHES)]
    tmp = tempfile.mkdtemp(prefix="tanuki-equiv-") if dist.get_rank() == 0 else None
    box = [tmp]
    dist.broadcast_object_list(box, src=0)
    tmp = box[0]

    ref = build_model(cfg, ParallelLayout(), opts)
    with torch.no_grad():  # one set of weights for every rank
        for p in ref[0].parameters():
            dist.broadcast(p, src=0)
    _save(ref, f"{tmp}/weights")
    ref_ddp = wrap_ddp(ref)
    ref_loss = forward_backward(ref_ddp, batches, SEQ, MBS)
    ref_grads = {n: p.main_grad.detach().clone() for n, p in ref[0].named_parameters()}

    results = {}
    for name, layout_dict in layouts.items():
        layout = ParallelLayout(**layout_dict)
        layout.validate(dist.get_world_size(), cfg)
        setup_model_parallel(layout, seed=seed + 1)  # a different seed: init must not matter
        chunks = build_model(cfg, layout, opts)
        _load(chunks, f"{tmp}/weights")
        ddp = wrap_ddp(chunks)
        loss = forward_backward(ddp, batches, SEQ, MBS)
        _grads_as_weights(ddp)
        _save(chunks, f"{tmp}/grads-{name}")
        grads = _full_params(f"{tmp}/grads-{name}", cfg, opts)
        diffs = {n: (grads[n] - g).abs().max().item() for n, g in ref_grads.items()}
        worst = max(diffs, key=diffs.get)
        results[name] = {
            "ref_loss": ref_loss, "loss": loss, "max_grad_diff": diffs[worst], "worst_param": worst,
            "num_params_compared": len(diffs),
            "max_ref_grad": max(g.abs().max().item() for g in ref_grads.values()),
            "min_ref_grad_norm": min(g.norm().item() for g in ref_grads.values()),
        }
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return results
