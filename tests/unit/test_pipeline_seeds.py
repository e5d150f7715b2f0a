"""Issue 9.5: pipeline stages do not start from the same random stream (Megatron-LM: seed + 100 * pp_rank).

Before the fix both stages drew from identical streams (the default generator and megatron-core's
tracked model-parallel RNG, which initializes weights on GPUs and drives dropout); only the
different amount of work before the first layer (stage 0 builds the embedding) made CPU weights differ.
"""
import torch

from megatron_tanuki.runtime.spawn import run_ranks


def _stage_weights(seed: int):
    from megatron_tanuki.models.registry import get_preset
    from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed

    cfg = get_preset("tanuki-8b-tiny")
    layout = ParallelLayout(pp=2)
    init_distributed(layout, cfg, seed=seed)
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    default = torch.rand(8)
    with get_cuda_rng_tracker().fork():
        tracked = torch.rand(8)
    (chunk,) = build_model(cfg, layout, BuildOptions())
    layer = chunk.decoder.layers[0]
    return {"qkv": layer.self_attention.linear_qkv.weight.detach().clone(),
            "fc1": layer.mlp.linear_fc1.weight.detach().clone(), "default": default, "tracked": tracked}


def test_pp2_from_scratch_stages_start_from_different_streams():
    first = run_ranks(_stage_weights, 2, 1234)
    for name in ("default", "tracked", "qkv", "fc1"):
        assert first[0][name].shape == first[1][name].shape
        assert not torch.equal(first[0][name], first[1][name]), f"{name}: stage 0 and stage 1 start equal"
