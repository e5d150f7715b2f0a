"""Grouped-GEMM experts (torch._grouped_mm) == megatron-core's SequentialMLP, and one checkpoint layout.

EP=1 here; EP=2 is a layout of tests/parallel/test_equivalence.py (``ep2_grouped``).
"""
import pytest
import torch
from megatron.core.activations import squared_relu
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_tanuki.models import specs
from megatron_tanuki.models.common.grouped_experts import GroupedGemmMLP
from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model, transformer_config
from megatron_tanuki.models.tanuki.config import TANUKI_8X8B_TINY
from megatron_tanuki.runtime.distributed import ParallelLayout

# tokens per expert, experts 1, 3 and 6 get none
COUNTS = [5, 0, 3, 0, 7, 1, 0, 4]


def _pair(ffn=96, gated=True, dtype=torch.float32):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    cfg = TANUKI_8X8B_TINY.replace(ffn_hidden_size=ffn)
    tcfg = transformer_config(cfg, ParallelLayout(), BuildOptions(), use_te=False)
    if not gated:  # Nemotron-4's ungated squared-ReLU experts
        tcfg.gated_linear_unit, tcfg.activation_func = False, squared_relu
    subs = specs.gpt_layer_spec(8, use_te=False, grouped_gemm=False).submodules.mlp.keywords["submodules"]
    sub = subs.experts.keywords["submodules"]
    pg = get_default_pg_collection()
    seq = SequentialMLP(8, tcfg, sub, pg_collection=pg).to(dtype)
    grp = GroupedGemmMLP(8, tcfg, sub, pg_collection=pg).to(dtype)
    grp.load_state_dict(seq.state_dict())
    return seq, grp


def _run(module, hidden, probs, counts, grad_out=None):
    hidden = hidden.clone().requires_grad_()
    probs = probs.clone().requires_grad_()
    out, bias = module(hidden, torch.tensor(counts), probs)
    assert bias is None
    (out.sum() if grad_out is None else (out * grad_out).sum()).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return out.detach(), hidden.grad, probs.grad, grads


def _inputs(counts, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    return (torch.randn(n, 64, generator=g).to(dtype), torch.rand(n, generator=g).to(dtype),
            torch.randn(n, 64, generator=g).to(dtype))


@pytest.mark.parametrize("gated", [True, False], ids=["swiglu", "squared_relu"])
@pytest.mark.parametrize("counts", [COUNTS, [0] * 8, [0] * 7 + [9]], ids=["random", "no_tokens", "one_expert"])
def test_grouped_equals_sequential_fp32(single_process, counts, gated):
    torch.manual_seed(0)
    seq, grp = _pair(gated=gated)
    hidden, probs, grad_out = _inputs(counts)
    assert grp._grouped_ok(hidden)  # the grouped kernel runs, not the fallback
    ref, got = _run(seq, hidden, probs, counts, grad_out), _run(grp, hidden, probs, counts, grad_out)
    # bit-exact on CPU: output, input and probs gradients, every weight gradient
    for a, b in zip(got[:3], ref[:3]):
        assert torch.equal(a, b)
    assert got[3].keys() == ref[3].keys() and len(ref[3]) == 16
    for name in ref[3]:
        assert torch.equal(got[3][name], ref[3][name]), name
    for e, n in enumerate(counts):  # an expert without tokens: zero gradient, as SequentialMLP's
        if n == 0:
            assert not got[3][f"local_experts.{e}.linear_fc1.weight"].any()


def test_sum_loss_zero_stride_grad_and_bf16(single_process):
    """``out.sum()`` hands the backward a zero-stride gradient; bf16 as SequentialMLP's too."""
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        seq, grp = _pair(dtype=dtype)
        hidden, probs, _ = _inputs(COUNTS, dtype)
        assert grp._grouped_ok(hidden)
        ref, got = _run(seq, hidden, probs, COUNTS), _run(grp, hidden, probs, COUNTS)
        for a, b in zip(got[:3], ref[:3]):  # bit-exact on CPU in bf16 too
            assert torch.equal(a, b), dtype
        for name in ref[3]:
            assert torch.equal(got[3][name], ref[3][name]), (name, dtype)


def test_unaligned_sizes_fall_back_to_sequential(single_process):
    """ffn 30: rows of 120 bytes, not a multiple of 16, which torch._grouped_mm refuses."""
    torch.manual_seed(0)
    seq, grp = _pair(ffn=30)
    assert not grp._grouped_ok(torch.zeros(1, 64))
    hidden, probs, grad_out = _inputs(COUNTS)
    ref, got = _run(seq, hidden, probs, COUNTS, grad_out), _run(grp, hidden, probs, COUNTS, grad_out)
    assert torch.equal(got[0], ref[0])


def _experts(model):
    return model.decoder.layers[0].mlp.experts


def test_checkpoint_moves_between_grouped_and_sequential(single_process, tmp_path):
    """Same parameters, same sharded_state_dict (keys, shapes, offsets): a checkpoint saved by one
    loads into the other, both ways -- so conversion (which writes through a SequentialMLP meta model)
    and resume work across the two."""
    from megatron.core import dist_checkpointing

    def build(grouped, seed):
        torch.manual_seed(seed)
        opts = BuildOptions(dtype="fp32", moe_grouped_gemm=grouped)
        return build_model(TANUKI_8X8B_TINY, ParallelLayout(), opts)[0]

    grp, seq = build(True, 1), build(False, 2)
    assert type(_experts(grp)) is GroupedGemmMLP and type(_experts(seq)) is SequentialMLP
    assert [n for n, _ in grp.named_parameters()] == [n for n, _ in seq.named_parameters()]

    def layout(model):  # ShardedTensor, ShardedObject, GLU ShardedTensorFactory alike
        return {k: (type(v).__name__, v.key, *(tuple(getattr(v, a, ())) for a in
                                                ("local_shape", "global_shape", "global_offset")),
                    tuple(v.data.shape) if isinstance(getattr(v, "data", None), torch.Tensor) else None)
                for k, v in model.sharded_state_dict().items()}

    assert layout(grp) == layout(seq)
    assert {v[1] for v in layout(grp).values()} >= {"decoder.layers.mlp.experts.experts.linear_fc1.weight",
                                                    "decoder.layers.mlp.experts.experts.linear_fc2.weight"}
    for src, dst, name in ((grp, seq, "g2s"), (seq, grp, "s2g")):
        (tmp_path / name).mkdir()
        dist_checkpointing.save(src.sharded_state_dict(), str(tmp_path / name))
        dst.load_state_dict(dist_checkpointing.load(dst.sharded_state_dict(), str(tmp_path / name)),
                            strict=False)
        for (n, a), b in zip(src.named_parameters(), dst.parameters()):
            assert torch.equal(a, b), n


def test_switch_default(monkeypatch):
    from megatron_tanuki.runtime import cpu

    monkeypatch.setattr(cpu, "gpu_present", lambda: False)
    assert not specs.grouped_gemm_default(use_te=False)
    monkeypatch.setattr(cpu, "gpu_present", lambda: True)
    monkeypatch.setattr(cpu, "is_active", lambda: False)
    assert specs.grouped_gemm_default(use_te=False) and specs.grouped_gemm_default(use_te=True)
