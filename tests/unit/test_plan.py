"""`tanuki model-info PRESET --plan tp=N,pp=N`: per-GPU weights and KV cache of a layout.

The 340B numbers are derived here by hand from the architecture (issue 12's table), never from the
code's output; the placement rules (stage, TP split) are checked against megatron-core's own per-rank
build of the tiny Nemotron-4 at TP=2 and PP=2.
"""
import argparse
import json

import pytest

from megatron_tanuki.models import plan as model_plan
from megatron_tanuki.runtime.spawn import run_ranks

# Nemotron-4-340B: layers, hidden, FFN, heads, KV groups, head dim, vocab
L, H, F, HEADS, GROUPS, HD, V = 96, 18432, 73728, 96, 8, 192, 256000
# one decoder layer: QKV [(96 + 2*8) * 192, H], proj [H, 96 * 192], fc1 [F, H], fc2 [H, F] -- all split
# over TP -- plus two LayerNorm1p (weight and bias) whole on every rank
LINEAR_PER_LAYER = (HEADS + 2 * GROUPS) * HD * H + H * HEADS * HD + 2 * F * H  # 3,454,009,344
NORMS_PER_LAYER = 2 * 2 * H  # 73,728
# tp=8,pp=2: the last stage (48 layers + output layer [V, H] / 8 + final norm) is the larger one:
# 48 * (3,454,009,344 / 8 + 73,728) + 256000 * 18432 / 8 + 2 * 18432 = 21,317,455,872 parameters x 2 bytes
TP8_PP2_WEIGHT_BYTES = 42_634_911_744
# tp=8,pp=1: 96 * (431,751,168 + 73,728) + 2 * 589,824,000 + 36,864 = 42,634,874,880 parameters x 2 bytes
TP8_PP1_WEIGHT_BYTES = 85_269_749_760
# fp8: the 96 layers' linear weights at 1 byte, the rest (norms, embedding, output layer) at 2
TP8_PP1_FP8_WEIGHT_BYTES = 96 * 431_751_168 + 2 * (96 * 73_728 + 2 * 589_824_000 + 36_864)  # 43,821,637,632


def test_the_hand_derivation_is_consistent():
    assert LINEAR_PER_LAYER == 3_454_009_344 and LINEAR_PER_LAYER % 8 == 0
    assert 2 * (48 * (LINEAR_PER_LAYER // 8 + NORMS_PER_LAYER) + V * H // 8 + 2 * H) == TP8_PP2_WEIGHT_BYTES
    assert 2 * (96 * (LINEAR_PER_LAYER // 8 + NORMS_PER_LAYER) + 2 * V * H // 8 + 2 * H) == TP8_PP1_WEIGHT_BYTES
    assert TP8_PP1_FP8_WEIGHT_BYTES == 43_821_637_632
    # the whole-model count: all of the above at TP=1
    assert L * (LINEAR_PER_LAYER + NORMS_PER_LAYER) + 2 * V * H + 2 * H == 341_029_195_776


def _args(*argv):
    p = argparse.ArgumentParser()
    p.add_argument("preset", nargs="?")
    p.add_argument("--list", action="store_true")
    p.add_argument("--json", action="store_true")
    model_plan.add_plan_arguments(p)
    return p.parse_args(list(argv))


def _run(capsys, *argv):
    rc = model_plan.run_plan(_args(*argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_340b_tp8_pp2_on_h100_bf16_fits(capsys):
    rc, out, err = _run(capsys, "nemotron4-340b", "--plan", "tp=8,pp=2", "--json")
    assert rc == 0, err
    p = json.loads(out)
    assert (p["gpus"], p["gpu"], p["gpu_memory_bytes"], p["dtype"]) == (16, "h100", 80_000_000_000, "bf16")
    assert p["weight_bytes_per_gpu"] == TP8_PP2_WEIGHT_BYTES and p["worst_stage"] == 1
    s0, s1 = p["stages"]
    assert (s0["layers"], s0["parts"]) == ([0, 47], ["embedding"])
    assert (s1["layers"], s1["parts"]) == ([48, 95], ["final norm", "output layer"])
    # stage 0 holds the embedding, the same size as the output layer, but not the final norm's 2 * 18432
    assert s1["parameters"] - s0["parameters"] == 2 * H
    assert p["kv_bytes_per_token"] == 589_824 == 2 * L * GROUPS * HD * 2  # the number
    assert p["kv_bytes_per_token_per_gpu"] == 2 * 48 * 1 * HD * 2 == 36_864
    free = 80_000_000_000 - TP8_PP2_WEIGHT_BYTES - 4_000_000_000
    assert p["free_bytes_per_gpu"] == free == 33_365_088_256
    assert p["sequences"] == free // (36_864 * 4096) == 220
    assert p["tokens"] == free // 36_864 == 905_085

    rc, out, err = _run(capsys, "nemotron4-340b", "--plan", "tp=8,pp=2", "--kv-tokens", "262144")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "nemotron4-340b: tp=8,pp=2 = 16 x H100 (80.0 GB), bf16 weights"
    assert lines[1] == ("  weights per GPU: 42.6 GB (42,634,911,744 bytes; stage 1 of 2, "
                        "21,317,455,872 parameters x 2 bytes)")
    assert "    stage 0: layers 0-47 + embedding: 21,317,419,008 parameters, 42.6 GB" in lines
    assert ("  KV cache (bf16): 589,824 bytes per token for the whole model; per GPU 36,864 = 2 (K, V) x 48 "
            "layers x 1 of 8 query groups x head dim 192 x 2 bytes") in lines
    assert ("  free per GPU for the KV cache: 33.4 GB = 80.0 GB - 42.6 GB weights - 4.0 GB reserve "
            "(CUDA context, activations, workspace; --reserve-gb)") in lines
    assert "  fits: 220 concurrent 4096-token sequences (905,085 tokens of KV cache)" in lines
    assert lines[-1] == "  --kv-tokens 262,144: fits: 9.7 GB of KV per GPU, 33.4 GB free"


def test_kv_tokens_that_do_not_fit(capsys):
    rc, out, err = _run(capsys, "nemotron4-340b", "--plan", "tp=8,pp=2", "--kv-tokens", "905086", "--json")
    assert rc == 0, err
    assert json.loads(out)["kv_tokens"] == {"requested": 905_086, "bytes_per_gpu": 905_086 * 36_864, "fits": False}
    rc, out, _ = _run(capsys, "nemotron4-340b", "--plan", "tp=8,pp=2", "--kv-tokens", "905085")
    assert rc == 0 and out.splitlines()[-1].startswith("  --kv-tokens 905,085: fits: ")
    rc, out, _ = _run(capsys, "nemotron4-340b", "--plan", "tp=8,pp=2", "--kv-tokens", "1000000")
    assert rc == 0
    assert out.splitlines()[-1] == ("  --kv-tokens 1,000,000: does NOT fit (at most 905,085 tokens): "
                                    "36.9 GB of KV per GPU, 33.4 GB free")


def test_340b_tp8_pp1_on_h100_bf16_is_refused(capsys):
    rc, out, err = _run(capsys, "nemotron4-340b", "--plan", "tp=8,pp=1")
    assert rc == 2 and out == ""
    assert err == ("tanuki model-info: error: nemotron4-340b at tp=8,pp=1 (bf16) does not fit on H100 (80.0 GB): "
                   "85.3 GB of weights per GPU (stage 0), 76.0 GB available (80.0 GB - 4.0 GB reserve); "
                   "pp=2 would need 42.6 GB per GPU\n")


def test_340b_tp8_pp1_fits_on_h200_bf16_and_on_h100_in_fp8(capsys):
    rc, out, err = _run(capsys, "nemotron4-340b", "--plan", "tp=8", "--gpu", "h200", "--json")
    assert rc == 0, err
    p = json.loads(out)
    assert (p["pp"], p["gpus"], p["gpu_memory_bytes"]) == (1, 8, 141_000_000_000)
    assert p["weight_bytes_per_gpu"] == TP8_PP1_WEIGHT_BYTES
    assert p["stages"][0]["parts"] == ["embedding", "final norm", "output layer"]
    assert p["kv_bytes_per_token_per_gpu"] == 2 * 96 * 1 * HD * 2 == 73_728
    assert p["sequences"] == (141_000_000_000 - TP8_PP1_WEIGHT_BYTES - 4_000_000_000) // (73_728 * 4096) == 171

    rc, out, err = _run(capsys, "nemotron4-340b", "--plan", "tp=8,pp=1", "--dtype", "fp8", "--json")
    assert rc == 0, err
    p = json.loads(out)
    assert p["weight_bytes_per_gpu"] == TP8_PP1_FP8_WEIGHT_BYTES
    assert p["bytes_per_parameter"] == {"decoder_linear_weights": 1, "other": 2}
    assert p["sequences"] == (80_000_000_000 - TP8_PP1_FP8_WEIGHT_BYTES - 4_000_000_000) // (73_728 * 4096) == 106
    rc, out, _ = _run(capsys, "nemotron4-340b", "--plan", "tp=8,pp=1", "--dtype", "fp8")
    assert rc == 0
    assert out.splitlines()[1] == ("  fp8: decoder layers' linear weights at 1 byte per parameter; embeddings, "
                                   "output layer, norms (and a reward head) at 2 (bf16)")


def test_reward_head_and_custom_card(capsys):
    rc, out, err = _run(capsys, "nemotron4-340b-reward", "--plan", "tp=8,pp=2", "--gpu-memory-gb", "96",
                        "--reserve-gb", "6", "--json")
    assert rc == 0, err
    p = json.loads(out)
    # rm_head [9, H] is row-parallel (split along H) with a bias of 9 kept whole, on the last stage
    assert p["stages"][1]["parts"] == ["final norm", "output layer", "reward head"]
    assert p["weight_bytes_per_gpu"] == TP8_PP2_WEIGHT_BYTES + 2 * (9 * H // 8 + 9)
    assert (p["gpu"], p["gpu_memory_bytes"], p["reserve_bytes"]) == (None, 96_000_000_000, 6_000_000_000)
    assert p["free_bytes_per_gpu"] == 96_000_000_000 - p["weight_bytes_per_gpu"] - 6_000_000_000


@pytest.mark.parametrize("argv,message", [
    (["--plan", "tp=16,pp=2"], "nemotron4-340b: 8 KV heads (query groups) are not divisible by TP=16"),
    (["--plan", "tp=8,pp=5"], "nemotron4-340b: 96 layers are not divisible into PP*VPP = 5 pipeline stages"),
    (["--plan", "tp=8,dp=2"], "--plan 'tp=8,dp=2': expected tp=N,pp=N with positive integers (e.g. tp=8,pp=2)"),
    (["--plan", "tp=0"], "--plan 'tp=0': expected tp=N,pp=N with positive integers (e.g. tp=8,pp=2)"),
    (["--kv-tokens", "5", "--dtype", "fp8"], "--kv-tokens, --dtype only with --plan tp=N,pp=N"),
    (["--plan", "tp=8,pp=2", "--kv-tokens", "0"], "--kv-tokens 0: must be a positive number of tokens"),
    (["--plan", "tp=8,pp=2", "--gpu-memory-gb", "0"], "--gpu-memory-gb 0: must be positive"),
])
def test_impossible_layouts_and_bad_options_are_one_line(capsys, argv, message):
    rc, out, err = _run(capsys, "nemotron4-340b", *argv)
    assert (rc, out, err) == (2, "", f"tanuki model-info: error: {message}\n")


def test_unknown_and_vision_presets_are_refused(capsys):
    rc, _, err = _run(capsys, "nemotron4-70b", "--plan", "tp=8")
    assert rc == 2 and err.startswith("tanuki model-info: error: unknown preset 'nemotron4-70b'; known presets: ")
    rc, _, err = _run(capsys, "tanuki-vision-8b", "--plan", "tp=1")
    assert rc == 2 and "tanuki-vision-8b: --plan covers language models" in err


def test_no_plan_options_means_no_plan():
    assert not model_plan.wanted(_args("nemotron4-340b"))
    assert model_plan.wanted(_args("nemotron4-340b", "--plan", "tp=8"))
    assert model_plan.wanted(_args("nemotron4-340b", "--gpu", "h200"))  # refused by run_plan: needs --plan
    with pytest.raises(SystemExit):  # one card or the other
        _args("nemotron4-340b", "--plan", "tp=8", "--gpu", "h200", "--gpu-memory-gb", "80")


# --- the placement rules against megatron-core's own build of each rank ------------------------------
def _rank_parameters(cfg, layout: dict):
    from megatron.core import parallel_state

    from megatron_tanuki.models import registry
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed

    par = ParallelLayout(**layout)
    init_distributed(par, cfg)
    (model,) = registry.build(cfg, par, BuildOptions(perform_initialization=False), device="meta")
    return {"tp": parallel_state.get_tensor_model_parallel_rank(),
            "pp": parallel_state.get_pipeline_model_parallel_rank(),
            "parameters": sum(p.numel() for p in model.parameters())}


# PP=2 with tied embeddings: stage placement and the embedding's copy on the last stage (the TP split of each
# parameter is checked against hand-derived byte counts above)
@pytest.mark.parametrize("layout, tied", [(dict(pp=2), True)], ids=["pp2-tied"])
def test_stage_parameters_equal_megatron_cores_ranks(layout, tied):
    from megatron_tanuki.models import registry

    cfg = registry.get_preset("nemotron4-tiny-reward").replace(tie_embeddings=tied)
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    plan = model_plan.make_plan(cfg, tp, pp, memory_bytes=1e9, reserve_bytes=0)
    for r in run_ranks(_rank_parameters, 2, cfg, layout):
        assert r["parameters"] == plan["stages"][r["pp"]]["parameters"], (r, plan["stages"])
