"""Rank-side code of the parallel-equivalence tests (run through runtime.spawn.run_ranks).

One reference run and then each layout under test, with the reference weights split into that
layout by megatron-core's own dist_checkpointing (saved from the reference model, loaded into the
parallel one). Gradients go back the same way: the parallel model's gradients are saved as if they
were weights and loaded into a reference-shaped model, so every parameter is compared element by
element, whatever its sharding.

The global batch is a list of micro-batches with *different* loss-mask counts. The reference runs
all of them on every rank: that is one rank's (DP=1) computation, replicated -- the DP all-reduce
then adds identical values and divides by twice the tokens, which is exact in floating point. A
layout gives each DP rank its own contiguous share (a DP=2 layout: each rank different data), so
the per-token weighting over DP (``calculate_per_token_loss``) is what is compared.

A layout may carry ``moe_grouped_gemm`` (a build option): that layout's experts are then the
grouped-GEMM module, compared with the reference's (CPU default) SequentialMLP.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model
from megatron_tanuki.models.registry import PRESETS  # any language-model preset (Tanuki, Nemotron-4)
from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed, setup_model_parallel
from megatron_tanuki.train.step import Batch, forward_backward, wrap_ddp

# 4 micro-batches: each DP=2 rank accumulates 2, and VPP needs M >= PP
SEQ, MBS, MICROBATCHES = 16, 2, 4
# real (loss-counted) tokens of each row, per micro-batch: the DP=2 shares hold 17 and 64 tokens,
# so a mean of per-rank means would weigh share 0's tokens ~4x too much
REAL_TOKENS = [(3, 5), (9, 0), (SEQ, SEQ), (SEQ, SEQ)]


def make_batches(vocab: int, seed: int) -> list[Batch]:
    out = []
    for i, rows in enumerate(REAL_TOKENS[:MICROBATCHES]):
        g = torch.Generator().manual_seed(seed + i)
        batch = Batch.causal_lm(torch.randint(0, vocab, (MBS, SEQ + 1), generator=g))
        for r, n in enumerate(rows):
            batch.loss_mask[r, n:] = 0
        out.append(batch)
    return out


def dp_share(batches: list) -> list:
    """This rank's contiguous share of the global batch (ranks of one DP replica get the same)."""
    size = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    if len(batches) % size:
        raise ValueError(f"{len(batches)} micro-batches do not split over DP={size}")
    n = len(batches) // size
    return batches[rank * n:(rank + 1) * n]


def shared_tmpdir(prefix: str) -> str:
    box = [tempfile.mkdtemp(prefix=prefix) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sharded(chunks):
    return {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save(chunks, path):
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded(chunks), path)


def load(chunks, path, strict: bool = False):
    state = dist_checkpointing.load(_sharded(chunks), path)
    for i, c in enumerate(chunks):
        c.load_state_dict(state[f"chunk{i}"], strict=strict)


def grads_as_weights(ddp_chunks):
    """Put each trainable parameter's accumulated gradient in place of its value (for saving);
    frozen parameters keep their weights."""
    with torch.no_grad():
        for c in ddp_chunks:
            for p in c.module.parameters():
                if p.requires_grad:
                    p.copy_(p.main_grad)


def trainable_grads(ddp_chunk) -> dict:
    return {n: p.main_grad.detach().clone() for n, p in ddp_chunk.module.named_parameters()
            if p.requires_grad}


def dp_grad_disagreement(ddp_chunks) -> float:
    """Largest difference between DP replicas of a reduced (non-expert) gradient: must be 0."""
    group = parallel_state.get_data_parallel_group()
    src = dist.get_global_rank(group, 0)
    worst = 0.0
    for c in ddp_chunks:
        for p in c.module.parameters():
            if p.requires_grad and getattr(p, "allreduce", True):
                theirs = p.main_grad.detach().clone()
                dist.broadcast(theirs, src=src, group=group)
                worst = max(worst, (theirs - p.main_grad).abs().max().item())
    t = torch.tensor([worst])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def compare_grads(got: dict, ref: dict) -> dict:
    """Per tensor: max |diff| (absolute), ||diff|| / ||ref|| and max |diff| / max |ref| (relative).

    The absolute number alone says little where many elements are ~1e-7; each relative one is
    reported with the tensor where it is worst.
    """
    per = {}
    for n, g in ref.items():
        d = (got[n] - g).double()
        g = g.double()
        per[n] = {"abs": d.abs().max().item(), "rel_norm": (d.norm() / g.norm()).item(),
                  "rel_max": (d.abs().max() / g.abs().max()).item()}
    out = {"num_params_compared": len(per), "min_ref_grad_norm": min(g.norm().item() for g in ref.values()),
           "max_ref_grad": max(g.abs().max().item() for g in ref.values())}
    for key in ("abs", "rel_norm", "rel_max"):
        worst = max(per, key=lambda n: per[n][key])
        out[f"max_grad_{key}"], out[f"worst_{key}"] = per[worst][key], worst
    return out


TOL = 1e-5  # absolute, on every gradient element and on the loss (relative there)
REL_TOL = 1e-5  # per tensor, relative to the reference tensor's norm and to its largest element


def check_grads(r: dict, num_params: int) -> None:
    """The absolute and both relative criteria on a compare_grads result (test side)."""
    assert r["num_params_compared"] == num_params, r
    assert r["min_ref_grad_norm"] > 0, "a parameter got no gradient: the comparison would be vacuous"
    assert r["max_grad_abs"] <= TOL, r
    assert r["max_grad_rel_norm"] <= REL_TOL, r
    assert r["max_grad_rel_max"] <= REL_TOL, r


def layout_gradients(ddp, chunks, share, batches, build, path, ref_grads) -> dict:
    """After this rank ran its ``share``: tokens per rank, DP replica agreement, and every
    gradient -- saved as weights from the layout, loaded into one rank's shapes -- against the reference."""
    tokens = [None] * dist.get_world_size()
    dist.all_gather_object(tokens, sum(int(b.loss_mask.sum()) for b in share))
    disagreement = dp_grad_disagreement(ddp)
    grads_as_weights(ddp)
    save(chunks, path)
    grads = full_params(build, path)
    return {"tokens_by_rank": tokens, "dp_size": len(batches) // len(share), "dp_grad_disagreement": disagreement,
            **compare_grads(grads, ref_grads)}


def full_params(build, path) -> dict:
    """Load a checkpoint into a reference-layout model and return name -> tensor."""
    setup_model_parallel(ParallelLayout())
    model = build(ParallelLayout())
    load(model, path)
    return {n: p.detach().clone() for n, p in model[0].named_parameters()}


def _weighting_sensitivity(ref_ddp, batches, ref_loss, ref_grads) -> dict:
    """What a per-rank mean (each DP share weighted equally) would give instead of the per-token
    mean: proof that the batches make a weighting bug visible above the tolerances."""
    losses, grads = [], []
    for share in (batches[:len(batches) // 2], batches[len(batches) // 2:]):
        for c in ref_ddp:
            c.zero_grad_buffer()
        losses.append(forward_backward(ref_ddp, share, SEQ, MBS))
        grads.append(trainable_grads(ref_ddp[0]))
    wrong = {n: (grads[0][n] + grads[1][n]) / 2 for n in ref_grads}
    return {"per_rank_mean_loss_diff": abs((losses[0] + losses[1]) / 2 - ref_loss),
            "per_rank_mean_grad_rel_norm": compare_grads(wrong, ref_grads)["max_grad_rel_norm"]}


def run(preset: str, layouts: dict[str, dict], aux_loss_coeff: float = 0.01, seed: int = 0) -> dict:
    cfg = PRESETS[preset]
    opts = BuildOptions(dtype="fp32", moe_aux_loss_coeff=aux_loss_coeff if cfg.is_moe else None)
    init_distributed(ParallelLayout(), cfg, seed=seed)
    batches = make_batches(cfg.vocab_size, seed)
    tmp = shared_tmpdir("tanuki-equiv-")

    def build(layout, grouped_gemm=None):
        return build_model(cfg, layout, dataclasses.replace(opts, moe_grouped_gemm=grouped_gemm))

    ref = build(ParallelLayout())
    with torch.no_grad():  # one set of weights for every rank
        for p in ref[0].parameters():
            dist.broadcast(p, src=0)
    save(ref, f"{tmp}/weights")
    ref_ddp = wrap_ddp(ref)
    ref_loss = forward_backward(ref_ddp, batches, SEQ, MBS)  # every rank: the whole global batch
    ref_grads = trainable_grads(ref_ddp[0])
    sensitivity = _weighting_sensitivity(ref_ddp, batches, ref_loss, ref_grads)

    results = {}
    for name, layout_dict in layouts.items():
        layout_dict = dict(layout_dict)
        grouped_gemm = layout_dict.pop("moe_grouped_gemm", None)  # vs the reference's SequentialMLP
        layout = ParallelLayout(**layout_dict)
        layout.validate(dist.get_world_size(), cfg)
        setup_model_parallel(layout, seed=seed + 1)  # a different seed: init must not matter
        chunks = build(layout, grouped_gemm)
        load(chunks, f"{tmp}/weights")
        ddp = wrap_ddp(chunks)
        share = dp_share(batches)
        loss = forward_backward(ddp, share, SEQ, MBS)
        results[name] = {"ref_loss": ref_loss, "loss": loss, **sensitivity,
                         **layout_gradients(ddp, chunks, share, batches, build, f"{tmp}/grads-{name}", ref_grads)}
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return results
