"""Decoding asks for the last position's logits only: the output layer then sees one position.

Equal to the last row of the full logits under TP=2 + sequence parallel (the output layer's input
is sequence-sharded there) and under PP=2, for the MoE model; and the pre-hooks are gone after.
"""
import pytest
import torch

from megatron_tanuki.runtime.spawn import run_ranks


def _compare(layout: dict):
    from megatron_tanuki.inference.logits import forward_logits
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed

    cfg = registry.get_preset("tanuki-8x8b-tiny")
    par = ParallelLayout(**layout)
    init_distributed(par, cfg)
    chunks = registry.build(cfg, par, BuildOptions())
    for c in chunks:
        c.eval()
    ids = torch.randint(3, 60000, (3, 12), generator=torch.Generator().manual_seed(0))
    full = forward_logits(chunks, ids)
    last = forward_logits(chunks, ids, last_only=True)
    again = forward_logits(chunks, ids)
    if full is None:
        return None
    return {"diff": (full[:, -1] - last).abs().max().item(), "shape": tuple(last.shape),
            "hooks_removed": torch.equal(full, again)}


@pytest.mark.parametrize("layout", [dict(tp=2, sp=True), dict(pp=2)], ids=["tp2_sp", "pp2"])
def test_last_only_logits_equal_the_last_row(layout):
    results = [r for r in run_ranks(_compare, 2, layout) if r is not None]
    assert results
    for r in results:
        assert r["shape"] == (3, 65024) and r["hooks_removed"]
        assert r["diff"] <= 1e-5, r
