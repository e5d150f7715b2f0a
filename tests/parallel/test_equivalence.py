"""Same weights, same batch: loss and every gradient equal between one rank and each layout.

Two processes over gloo; the multi-rank weights are the single-rank weights split (see
equivalence.py). fp32 throughout; tolerance 1e-5 as in the issue.
"""
import pytest

from megatron_tanuki.runtime.spawn import run_ranks
from tests.parallel import equivalence

TOL = 1e-5
DENSE = {"tp2": dict(tp=2), "pp2": dict(pp=2)}
MOE = {"ep2": dict(ep=2), "tp2_sp": dict(tp=2, sp=True), "pp2_vpp2": dict(pp=2, vpp=2)}
# tiny dense: embedding, output, final norm + 4 layers x (2 norms, qkv, proj, fc1, fc2) = 27
# tiny MoE: 3 + 4 x (2 norms, qkv, proj, router, 8 experts x (fc1, fc2)) = 3 + 4 x 21 = 87
PARAMS = {"tanuki-8b-tiny": 27, "tanuki-8x8b-tiny": 87}


@pytest.fixture(scope="module")
def dense_results():
    return run_ranks(equivalence.run, 2, "tanuki-8b-tiny", DENSE)[0]


@pytest.fixture(scope="module")
def moe_results():
    return run_ranks(equivalence.run, 2, "tanuki-8x8b-tiny", MOE, aux_loss_coeff=0.01)[0]


def _check(r, preset):
    assert r["num_params_compared"] == PARAMS[preset]
    assert r["min_ref_grad_norm"] > 0, "a parameter got no gradient: the comparison would be vacuous"
    assert abs(r["loss"] - r["ref_loss"]) <= TOL, r
    assert r["max_grad_diff"] <= TOL, r


@pytest.mark.parametrize("layout", sorted(DENSE))
def test_dense_layout_equals_single_rank(dense_results, layout):
    _check(dense_results[layout], "tanuki-8b-tiny")


@pytest.mark.parametrize("layout", sorted(MOE))
def test_moe_layout_equals_single_rank(moe_results, layout):
    _check(moe_results[layout], "tanuki-8x8b-tiny")
