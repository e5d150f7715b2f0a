"""Tanuki-vision (tiny MoE) under other layouts equals one rank (fp32, 2 gloo processes).

Forward: logits under TP=2+SP and PP=2 (vision on stage 0). Backward, stage-2 training (projector
and LLM trainable, SigLIP tower frozen): the loss and every trainable gradient under EP=2 (each rank
its own micro-batch: the non-expert parameters are data parallel) and TP=2+SP, by the absolute and
relative criteria of test_equivalence.
"""
import pytest

from megatron_tanuki.runtime.spawn import run_ranks
from tests.parallel import vlm_equivalence
from tests.parallel.equivalence import TOL, check_grads

LAYOUTS = {"tp2_sp": dict(tp=2, sp=True), "pp2": dict(pp=2)}
BACKWARD = {"ep2": dict(ep=2), "tp2_sp": dict(tp=2, sp=True)}
# the tiny MoE LLM's 87 (test_equivalence) + projector fc1, fc2 (weight, bias) = 91
TRAINABLE = 91
# loss-counted tokens of the two micro-batches: 2 x 7 text labels each, 5 masked in the first
MICROBATCH_TOKENS = [9, 14]


@pytest.fixture(scope="module")
def results():
    return run_ranks(vlm_equivalence.run, 2, "tanuki-vision-8x8b-tiny", LAYOUTS, BACKWARD)[0]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_vlm_layout_equals_single_rank(results, layout):
    r = results[layout]
    assert r["shape"][0] == 2 and r["max_abs_diff"] <= 1e-4 and r["top1_equal"], r


@pytest.mark.parametrize("layout", sorted(BACKWARD))
def test_vlm_backward_equals_single_rank(results, layout):
    r = results[f"backward_{layout}"]
    check_grads(r, TRAINABLE)
    assert r["frozen_prefixes"] == ["vision_model"] and r["num_frozen"] > 0, r
    assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), r
    assert r["dp_grad_disagreement"] == 0.0, r
    expected = MICROBATCH_TOKENS if layout == "ep2" else [sum(MICROBATCH_TOKENS)] * 2
    assert r["tokens_by_rank"] == expected and r["dp_size"] == (2 if layout == "ep2" else 1), r
