"""Tanuki-vision under TP=2 and PP=2 (vision on stage 0) equals one rank (fp32, 2 gloo processes)."""
import pytest

from megatron_tanuki.runtime.spawn import run_ranks
from tests.parallel import vlm_equivalence

LAYOUTS = {"tp2_sp": dict(tp=2, sp=True), "pp2": dict(pp=2)}


@pytest.fixture(scope="module")
def results():
    return run_ranks(vlm_equivalence.run, 2, "tanuki-vision-8x8b-tiny", LAYOUTS)[0]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_vlm_layout_equals_single_rank(results, layout):
    r = results[layout]
    assert r["shape"][0] == 2 and r["max_abs_diff"] <= 1e-4 and r["top1_equal"], r
