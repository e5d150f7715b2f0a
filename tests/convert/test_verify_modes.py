"""`convert verify` beyond the Tanuki defaults: another vocabulary (its own tokenizer or random ids),
bf16, the first N layers, a memory budget; progress output of conversion and verify."""
import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from megatron_tanuki.convert import engine, mcore_io, verify
from megatron_tanuki.models.registry import get_preset
from tests.convert import tiny_hf, tiny_llava
from tests.convert.test_convert import TANUKI

VOCAB = 512
LAYERS = 4


def _llama512(path: str) -> str:
    """A Llama-layout checkpoint with its own 512-token vocabulary and 4 layers (not Tanuki's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(intermediate_size=160, **{**tiny_hf.COMMON, "vocab_size": VOCAB, "num_hidden_layers": LAYERS})
    return tiny_hf.save(LlamaForCausalLM(cfg).eval(), path)


def _word_tokenizer(folder: str, words: int) -> None:
    """A real tokenizer.json (WordLevel): <unk> <s> </s> then w3, w4, ... with id = the number."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, words)}}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    tk.save(os.path.join(folder, "tokenizer.json"))


def tanuki(*args, check=True, env=None):
    r = subprocess.run([TANUKI, *args], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def run_json(*args, env=None):
    r = tanuki("convert", "verify", *args, "--json", env=env)
    return json.loads(r.stdout), r.stderr


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("vocab512")
    hf, mc = _llama512(str(base / "hf")), str(base / "mcore")
    r = tanuki("convert", "hf-to-mcore", "--hf", hf, "--out", mc, env={"TANUKI_PROGRESS": "1"})
    return {"hf": hf, "mcore": mc, "convert_stderr": r.stderr, "base": base}


def test_conversion_shows_a_byte_progress_bar(small):
    err = small["convert_stderr"]
    total = os.path.getsize(os.path.join(small["hf"], "model.safetensors"))
    assert re.search(r"hf-to-mcore: 100%\|[^|]*\| \d+(\.\d+)?k/\d+(\.\d+)?k \[[^\]]*B/s\]", err), err
    assert 400_000 < total < 600_000  # the bar counts kB of tensor data: 476k here


def test_other_vocabulary_verifies_at_tp2_with_random_ids(small):
    r, err = run_json("--hf", small["hf"], "--ckpt", small["mcore"], "--tp", "2", env={"TANUKI_PROGRESS": "1"})
    assert r["ok"] and r["max_abs_diff"] <= 1e-4 and r["top1_agreement"] == 1.0, r
    assert r["tokens"] == verify.RANDOM_TOKENS == 32 and r["dtype"] == "fp32" and r["layers"] == LAYERS
    side = os.path.join(small["mcore"], "hf")
    assert r["inputs"] == f"32 random ids (seed 0) below 512: no tokenizer.model / tokenizer.json in {small['hf']} or {side}"
    assert f"verify: inputs: {r['inputs']}\n" in err
    assert "verify: building the megatron-core model (TP=2 PP=1 EP=1 ETP=2 CP=1, fp32) on 2 rank(s)" in err
    assert "verify: loading rank 0's share of the checkpoint: 100%" in err


def test_text_outside_the_vocabulary_is_a_named_error(small):
    from megatron_tanuki.data.tokenizer import DEFAULT_MODEL, TanukiTokenizer

    ids = TanukiTokenizer().encode("たぬき", bos=True)
    r = tanuki("convert", "verify", "--hf", small["hf"], "--ckpt", small["mcore"], "--tp", "2", "--text", "たぬき",
               check=False)
    side = os.path.join(small["mcore"], "hf")
    first_bad = next(i for i in ids if i >= VOCAB)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"tanuki convert: error: verify: --text, tokenized with the shipped Tanuki tokenizer {DEFAULT_MODEL} "
        f"(no tokenizer in {small['hf']} or {side}), gives token id {first_bad} "
        f"({sum(i >= VOCAB for i in ids)} of {len(ids)} ids), outside the checkpoint's vocabulary of 512 "
        f"(vocab_size in {small['hf']}/config.json); give a --text this vocabulary covers, or put the "
        f"checkpoint's tokenizer in its folder")
    assert "Traceback" not in r.stderr and "IndexError" not in r.stderr


def test_the_folders_own_tokenizer_is_used(small, tmp_path):
    hf = str(tmp_path / "hf")
    shutil.copytree(small["hf"], hf)
    _word_tokenizer(hf, words=600)  # the tokenizer knows more words than the model has rows
    r, _ = run_json("--hf", hf, "--ckpt", small["mcore"], "--text", "w7 w300 w511 w9")
    assert r["ok"] and r["tokens"] == 5, r  # <s> + 4 words
    assert r["inputs"] == f"--text, tokenized with {hf}/tokenizer.json"
    bad = tanuki("convert", "verify", "--hf", hf, "--ckpt", small["mcore"], "--text", "w7 w599", check=False)
    assert bad.returncode == 2 and (f"verify: --text, tokenized with {hf}/tokenizer.json, gives token id 599 "
                                    f"(1 of 3 ids), outside the checkpoint's vocabulary of 512") in bad.stderr


def test_first_layers_against_a_reference_with_those_layers(small):
    r, err = run_json("--hf", small["hf"], "--ckpt", small["mcore"], "--pp", "2", "--layers", "2")
    assert r["ok"] and r["layers"] == 2 and r["total_layers"] == LAYERS and r["max_abs_diff"] <= 1e-4, r
    assert f"transformers reference from {small['hf']}: 2 of 4 layers in fp32" in err
    # the comparison has teeth: the first two layers' logits are not the whole model's
    ids = torch.tensor([verify._random_ids(VOCAB, False)])
    two = verify.hf_reference_logits(small["hf"], ids, layers=2)
    four = verify.hf_reference_logits(small["hf"], ids)
    assert (two - four).abs().max().item() > 1e-2


def test_layer_counts_that_cannot_work_are_named(small):
    r = tanuki("convert", "verify", "--hf", small["hf"], "--ckpt", small["mcore"], "--pp", "2", "--layers", "3",
               check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "tanuki convert: error: llama: 3 layers are not divisible into PP*VPP = 2 pipeline stages"), r.stderr
    r = tanuki("convert", "verify", "--hf", small["hf"], "--ckpt", small["mcore"], "--layers", "5", check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "tanuki convert: error: verify --layers 5: the checkpoint has 4 layers"), r.stderr


def test_bf16_compares_both_sides_in_bf16(small):
    r, _ = run_json("--hf", small["hf"], "--ckpt", small["mcore"], "--tp", "2", "--dtype", "bf16", "--layers", "2")
    assert r["ok"] and r["dtype"] == "bf16" and r["layers"] == 2, r
    ref = verify.hf_reference_logits(small["hf"], torch.tensor([verify._random_ids(VOCAB, False)]), torch.bfloat16, 2)
    assert r["tolerance"] == pytest.approx(0.05 * ref.abs().max().item(), rel=1e-6)
    # bf16 really ran: the difference is rounding-sized, far above fp32's (<= 1e-6 on this model)
    assert 1e-4 < r["max_abs_diff"] <= r["tolerance"]


def test_memory_budget_picks_the_layers_that_fit(small):
    from megatron_tanuki.convert.safetensors_io import HFCheckpoint
    from megatron_tanuki.models.checkpoint_meta import read_meta

    src = HFCheckpoint(small["hf"])
    shapes = {n: src.shape(n) for n in src.names()}
    cfg = read_meta(small["mcore"]).config
    two = verify.memory_estimate(shapes, cfg, torch.float32, 2, ep=1, world=2)
    assert verify.layers_for_budget(shapes, cfg, torch.float32, two, pp=2, ep=1, world=2) == 2
    with pytest.raises(verify.VerifyError, match=r"even 2 layer\(s\) need about \d+\.\d GB in fp32, over the "
                                                 r"memory budget of 1\.0 GB"):
        verify.layers_for_budget(shapes, cfg, torch.float32, 1.0, pp=2, ep=1, world=2)


def test_tanuki_8x8b_estimate_and_what_a_32gb_convert_node_verifies():
    """Finding 10's numbers, from the real preset's HF shapes (built on the meta device)."""
    cfg = get_preset("tanuki-8x8b")
    _, _, mcore_shapes = mcore_io.model_layout(cfg, torch.bfloat16)
    shapes = engine.expected_hf_shapes(cfg, 65024, mcore_shapes)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    assert params == 46_973_325_312  # 187.9 GB in fp32
    fp32 = verify.memory_estimate(shapes, cfg, torch.float32, 32, ep=1, world=1)
    bf16 = verify.memory_estimate(shapes, cfg, torch.bfloat16, 32, ep=1, world=1)
    assert 200 < fp32 < 215 and 100 < bf16 < 110  # ~190 GB of fp32 weights, 95 GB in bf16, + margin
    assert verify.layers_for_budget(shapes, cfg, torch.bfloat16, 32, pp=1, ep=1, world=1) == 8
    assert verify.layers_for_budget(shapes, cfg, torch.bfloat16, 120, pp=1, ep=1, world=1) == 32


def test_vlm_first_layer_in_bf16(tmp_path):
    p = tiny_llava.build(str(tmp_path / "vlm"), moe=False)
    mc = str(tmp_path / "mcore")
    tanuki("convert", "hf-to-mcore", "--hf", p["llava"], "--out", mc)
    r = tanuki("convert", "verify", "--hf", p["llava"], "--ckpt", mc, "--layers", "1", "--dtype", "bf16", "--json")
    res = json.loads(r.stdout)
    assert res["ok"] and res["images"] == 1 and res["layers"] == 1 and res["total_layers"] == 2, res
    assert res["inputs"].startswith("32 random ids (seed 0) below 65024")
    from megatron_tanuki.models.checkpoint_meta import read_meta

    # 32 ids and one image placeholder, expanded to the S2 grid's features
    assert res["tokens"] == 32 + read_meta(mc).config.num_image_tokens


def test_slurm_convert_hands_verify_the_jobs_memory():
    """slurm/convert.sh under DRY_RUN: --mem of the job (SLURM_MEM_PER_NODE, MB) becomes verify's budget;
    --mem-per-cpu times the CPUs likewise; an explicit --layers is kept; conversion is unchanged."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def dry(*args, **env):
        full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        r = subprocess.run(["bash", os.path.join(root, "slurm", "convert.sh"), *args], capture_output=True,
                           text=True, env={**full, "DRY_RUN": "1", "SLURM_SUBMIT_DIR": root, **env}, cwd="/")
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().splitlines()[-1], r.stderr

    py = f"{root}/.venv/bin/python -m megatron_tanuki.cli convert"
    out, err = dry("verify", "--hf", "a", "--ckpt", "b", SLURM_JOB_ID="7", SLURM_MEM_PER_NODE="32768")
    assert out == f"{py} verify --hf a --ckpt b --memory-budget-gb 32"
    assert "[slurm] verify: memory budget 32 GB (the job's memory)" in err
    out, _ = dry("verify", "--hf", "a", "--ckpt", "b", SLURM_MEM_PER_CPU="4096", SLURM_CPUS_ON_NODE="8")
    assert out == f"{py} verify --hf a --ckpt b --memory-budget-gb 32"
    out, _ = dry("verify", "--hf", "a", "--ckpt", "b", "--layers", "4", SLURM_MEM_PER_NODE="32768")
    assert out == f"{py} verify --hf a --ckpt b --layers 4"
    out, _ = dry("hf-to-mcore", "--hf", "a", "--out", "b", SLURM_MEM_PER_NODE="32768")
    assert out == f"{py} hf-to-mcore --hf a --out b"
    free = int(next(ln.split()[1] for ln in open("/proc/meminfo") if ln.startswith("MemAvailable:"))) // 1048576
    out, _ = dry("verify", "--hf", "a", "--ckpt", "b", LOCAL="1", SLURM_MEM_PER_NODE="32768")
    assert out in (f"{py} verify --hf a --ckpt b --memory-budget-gb {g}" for g in (free - 1, free, free + 1))
