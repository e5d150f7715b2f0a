"""Upcycling (seed recipe) and every bad input the conversion must refuse cleanly."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.convert import tiny_hf
from tests.convert.test_convert import tanuki, tensors


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    base = tmp_path_factory.mktemp("upcycle")
    return tiny_hf.save(tiny_hf.dense_model(seed=3), str(base / "dense"), max_shard_size="5MB"), base


def test_upcycle_with_zero_noise_computes_the_dense_model(dense):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    src, base = dense
    out = str(base / "moe0")
    tanuki("upcycle", "--dense", src, "--experts", "4", "--noise", "0", "--seed", "0", "--out", out)
    moe = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ref = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert type(moe).__name__ == "TanukiForCausalLM" and moe.config.num_local_experts == 4
    ids = torch.tensor([[1, 13414, 282, 483, 275, 1425, 427, 274, 1040, 270]])
    with torch.no_grad():
        a, b = moe(ids).logits, ref(ids).logits
    # p1*y + p2*y with p1 + p2 = 1: equal up to the last bits of fp32
    assert (a - b).abs().max().item() <= 1e-5
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_upcycle_noise_is_seeded_and_to_mcore_verifies(dense):
    src, base = dense
    a, b = str(base / "moe-a"), str(base / "moe-b")
    for out in (a, b):
        tanuki("upcycle", "--dense", src, "--experts", "4", "--noise", "0.01", "--seed", "7", "--out", out)
    ta, tb, td = tensors(a), tensors(b), tensors(src)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    w1 = [ta[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"].float() for e in range(4)]
    gate = td["model.layers.0.mlp.gate_proj.weight"].float()
    assert not torch.equal(w1[0], w1[1])  # experts differ
    assert 0.005 < (w1[0] - gate).std().item() < 0.02  # by ~noise
    mc = str(base / "moe-mcore")
    tanuki("upcycle", "--dense", src, "--experts", "4", "--noise", "0.01", "--seed", "7", "--to", "mcore", "--out", mc)
    r = json.loads(tanuki("convert", "verify", "--hf", a, "--ckpt", mc, "--ep", "2", "--json").stdout)
    assert r["ok"], r


# --- bad input: message names the file/tensor, nonzero exit, nothing that looks finished ----------

def _refused(args, out, *needles):
    r = tanuki(*args, check=False)
    assert r.returncode != 0
    for n in needles:
        assert n in r.stderr, r.stderr
    parent = os.path.dirname(out)
    left = [f for f in os.listdir(parent) if f.startswith(os.path.basename(out))]
    assert left == [], left
    return r.stderr


@pytest.fixture()
def broken(dense, tmp_path):
    src, _ = dense
    copy = str(tmp_path / "hf")
    shutil.copytree(src, copy)
    return copy, str(tmp_path / "out")


def _shards(folder):
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


def test_truncated_safetensors(broken):
    hf, out = broken
    shard = sorted(set(_shards(hf).values()))[-1]
    path = os.path.join(hf, shard)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    _refused(["convert", "hf-to-mcore", "--hf", hf, "--out", out], out, "truncated safetensors file", shard,
             "tensor ")


def test_shard_in_index_but_missing(broken):
    hf, out = broken
    shard = sorted(set(_shards(hf).values()))[0]
    os.remove(os.path.join(hf, shard))
    _refused(["convert", "hf-to-mcore", "--hf", hf, "--out", out], out, f"shard {shard}", "is missing",
             "model.safetensors.index.json")


def test_shape_disagrees_with_config(broken):
    hf, out = broken
    cfg_path = os.path.join(hf, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(cfg_path, "w"))
    _refused(["convert", "hf-to-mcore", "--hf", hf, "--out", out], out,
             "tensor model.layers.0.mlp.gate_proj.weight has shape [160, 64], config.json implies [128, 64]")


def test_unknown_model_type(broken):
    hf, out = broken
    cfg_path = os.path.join(hf, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(cfg_path, "w"))
    _refused(["convert", "hf-to-mcore", "--hf", hf, "--out", out], out, "unknown model_type 'gpt2'", cfg_path)


def test_expert_count_disagrees_with_weights(dense, tmp_path):
    src, base = dense
    moe = str(tmp_path / "moe")
    tanuki("upcycle", "--dense", src, "--experts", "4", "--noise", "0", "--out", moe)
    cfg_path = os.path.join(moe, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["num_local_experts"] = 8
    json.dump(cfg, open(cfg_path, "w"))
    out = str(tmp_path / "out")
    _refused(["convert", "hf-to-mcore", "--hf", moe, "--out", out], out,
             "num_local_experts=8, but the weights hold 4 experts")


def test_existing_output_is_refused_unless_overwrite(dense, tmp_path):
    src, _ = dense
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = tanuki("convert", "hf-to-mcore", "--hf", src, "--out", str(out), check=False)
    assert r.returncode != 0 and f"output path exists: {out}" in r.stderr and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    tanuki("convert", "hf-to-mcore", "--hf", src, "--out", str(out), "--overwrite")
    assert not (out / "keep.txt").exists() and (out / "metadata.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_bench_convert_runs_and_reports():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "bench_convert.py"), "--preset",
                        "tanuki-8x8b-tiny", "--layers", "1", "--json"], capture_output=True, text=True,
                       timeout=600, check=True)
    res = json.loads(r.stdout)
    assert res["preset"] == "tanuki-8x8b-tiny" and res["checkpoint_gb"] > 0
    for step in ("raw_read_write", "hf_to_mcore", "mcore_to_hf"):
        assert res[step]["seconds"] > 0 and res[step]["gb_per_s"] > 0 and res[step]["peak_rss_gb"] > 0
    assert res["hf_to_mcore"]["ratio_to_raw"] > 0


def test_bench_convert_nemo_case_runs_reports_and_writes_the_fixture_format(tmp_path):
    """`--source nemo` at the fixture's shape: the synthetic folder is the released format file for file
    (same arrays, chunk files, .zarray bytes, metadata.json as tests/data/nemo-zarr-tiny), its
    conversion loads as Nemotron-4 with the source's exact bits, and the report's numbers add up."""
    from megatron_tanuki.convert import mcore_io
    from megatron_tanuki.convert.nemo_zarr import NemoCheckpoint
    from megatron_tanuki.models.checkpoint_meta import read_meta
    from megatron_tanuki.models.nemotron4.hf_config import from_nemo_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    fixture = os.path.join(root, "tests", "data", "nemo-zarr-tiny")
    r = subprocess.run([sys.executable, os.path.join(root, "tools", "bench_convert.py"), "--source", "nemo", "--preset",
                        "nemotron4-tiny", "--keep", "--workdir", str(tmp_path), "--json"], capture_output=True,
                       text=True, timeout=600, check=True)
    res = json.loads(r.stdout)
    # 4 layers x (qkv 128x64 + proj 64x64 + fc1 128x64 + fc2 64x128 in bf16 + 4 norms of 64 in fp32),
    # embedding and output layer 256x64 bf16, final norm 2x64 fp32
    assert (res["source"], res["preset"], res["layers"], res["tp"]) == ("nemo", "nemotron4-tiny", 4, 8)
    assert (res["checkpoint_bytes"], res["largest_tensor_bytes"], res["largest_layer_slice_bytes"]) == (299520, 32768, 16384)
    for step in ("raw_read_write", "nemo_to_mcore"):
        s = res[step]
        assert s["seconds"] > 0 and s["gb_per_s"] > 0 and s["call_peak_rss_bytes"] >= s["baseline_rss_bytes"] > 0
        assert s["peak_rss_gb"] >= s["call_peak_rss_gb"] - 0.001
    c = res["nemo_to_mcore"]
    over = c["call_peak_rss_bytes"] - c["baseline_rss_bytes"]
    assert c["rss_over_largest_tensor"] == round(over / 32768, 3)
    assert c["rss_over_largest_layer_slice"] == round(over / 16384, 3)
    assert c["rss_budget_gb"] == round((2 * 32768 + c["baseline_rss_bytes"]) / 1e9, 3) and c["ratio_to_raw"] > 0

    src, out = res["nemo"], res["output"]
    files = lambda top: sorted(os.path.relpath(os.path.join(d, f), top) for d, _, fs in os.walk(top) for f in fs)
    mine, theirs = os.path.join(src, "model_weights"), os.path.join(fixture, "model_weights")
    # 12 arrays (.zarray each), 8 + 8 vocabulary shards, 2 + 16 norm chunks, 4 x 4 x 8 matrix chunks, 16 _extra_state
    assert files(mine) == files(theirs) and len(files(mine)) == 2 + 12 + 16 + 18 + 128 + 16
    for rel in files(theirs):
        if rel.endswith((".zarray", "metadata.json")):
            with open(os.path.join(mine, rel), "rb") as a, open(os.path.join(theirs, rel), "rb") as b:
                assert a.read() == b.read(), rel
    ours, ref = NemoCheckpoint(src), NemoCheckpoint(fixture)
    assert (from_nemo_config(ours.yaml, "mine", 256).replace(name="x")
            == from_nemo_config(ref.yaml, "fixture", 256).replace(name="x"))

    cfg, dtype, hf_vocab = read_meta(out)
    assert cfg.to_dict()["kind"] == "nemotron4" and dtype == torch.bfloat16 and hf_vocab == 256
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
            cfg.vocab_size) == (4, 64, 128, 16, 8, 256)
    assert sorted(os.listdir(os.path.join(out, "hf"))) == ["config.json", "model_config.yaml"]
    _, pieces, shapes = mcore_io.model_layout(cfg, dtype)
    reader = mcore_io.CheckpointReader(out)
    pairs = {"embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
             "decoder.layers.3.mlp.linear_fc1.weight": "decoder.layers.3.mlp.linear_fc1.weight",
             "decoder.layers.1.self_attention.linear_proj.weight": "decoder.layers.1.self_attention.linear_proj.weight",
             "decoder.layers.2.pre_mlp_layernorm.bias": "decoder.layers.2.mlp.linear_fc1.layer_norm_bias"}
    for param, name in pairs.items():
        got, want = reader.read_param(pieces[param], shapes[param]), ours.get(name).to(torch.bfloat16)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), param
