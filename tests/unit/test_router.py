"""The Tanuki router: standardized logits, then Mixtral top-2 routing."""
import torch

from megatron_tanuki.models.tanuki.router import STANDARDIZE_EPS, TanukiRouter, standardize_logits


def _formula(x):
    mean = x.mean(-1, keepdim=True)
    std = ((x - mean) ** 2).sum(-1, keepdim=True).div(x.shape[-1] - 1).sqrt()  # unbiased
    return (x - mean) / (std + 1e-5)


def test_standardize_equals_formula_on_random_logits():
    x = torch.randn(64, 8, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(standardize_logits(x), _formula(x), rtol=0, atol=1e-12)
    assert STANDARDIZE_EPS == 1e-5


def test_standardize_ties_and_constant_row():
    x = torch.tensor([[2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # tie at the top
                      [5.0] * 8,  # constant row: std 0, result exactly 0 (no NaN)
                      [1.0, -1.0] * 4], dtype=torch.float64)
    z = standardize_logits(x)
    torch.testing.assert_close(z, _formula(x), rtol=0, atol=1e-12)
    assert torch.equal(z[1], torch.zeros(8, dtype=torch.float64))
    assert z[0, 0] == z[0, 1] and z[0, 2] == z[0, 7]
    # unbiased std of [1,-1]*4 is sqrt(8/7)
    assert abs(z[2, 0].item() - 1 / ((8 / 7) ** 0.5 + 1e-5)) < 1e-12


def _mixtral_reference(hidden, weight, k):
    """The seed team's HF routing: standardize, softmax over all, top-k, renormalize."""
    logits = _formula(hidden @ weight.t())
    probs = torch.softmax(logits, dim=-1)
    top, idx = probs.topk(k, dim=-1)
    return top / top.sum(-1, keepdim=True), idx


def _router(single_process, num_experts=8, hidden=16):
    from megatron_tanuki.models.tanuki.builder import BuildOptions, transformer_config
    from megatron_tanuki.models.tanuki.config import TANUKI_8X8B_TINY
    from megatron_tanuki.runtime.distributed import ParallelLayout

    cfg = TANUKI_8X8B_TINY.replace(hidden_size=hidden, num_experts=num_experts)
    tcfg = transformer_config(cfg, ParallelLayout(), BuildOptions(moe_aux_loss_coeff=0.0), use_te=False)
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return TanukiRouter(config=tcfg, pg_collection=get_default_pg_collection())


def test_router_routes_like_the_hf_reference(single_process):
    torch.manual_seed(0)
    router = _router(single_process)
    x = torch.randn(5, 3, 16)  # [seq, batch, hidden]
    probs, routing_map = router(x)
    ref_probs, ref_idx = _mixtral_reference(x.reshape(-1, 16), router.weight.detach(), 2)
    assert routing_map.shape == (15, 8) and routing_map.sum(-1).eq(2).all()
    chosen = routing_map.nonzero()[:, 1].view(15, 2)
    assert torch.equal(chosen.sort(-1).values, ref_idx.sort(-1).values)
    got = probs.gather(1, ref_idx)
    torch.testing.assert_close(got, ref_probs, rtol=0, atol=1e-6)


def test_router_constant_logits_do_not_produce_nan(single_process):
    router = _router(single_process)
    with torch.no_grad():
        router.weight.zero_()  # every logit 0: standardization must stay finite
    probs, routing_map = router(torch.randn(4, 1, 16))
    assert torch.isfinite(probs).all()
    assert routing_map.sum(-1).eq(2).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
