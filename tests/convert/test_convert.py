"""HF <-> Megatron conversion on tiny random checkpoints built with transformers classes."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tests.convert import tiny_hf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")


def tanuki(*args, check=True):
    r = subprocess.run([TANUKI, *args], capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def tensors(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("convert")
    out = {}
    for kind, model in (("dense", tiny_hf.dense_model()), ("moe", tiny_hf.moe_model())):
        hf = tiny_hf.save(model, str(base / f"{kind}-hf"), max_shard_size="5MB")
        mc, back = str(base / f"{kind}-mcore"), str(base / f"{kind}-back")
        tanuki("convert", "hf-to-mcore", "--hf", hf, "--out", mc)
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), "mcore-to-hf",
                            "--ckpt", mc, "--out", back], capture_output=True, text=True, check=True)
        assert "GB/s" in r.stdout
        out[kind] = (hf, mc, back)
    return out


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_round_trip_is_bit_exact(ckpts, kind):
    hf, _, back = ckpts[kind]
    a, b = tensors(hf), tensors(back)
    assert a.keys() == b.keys() and len(a) == {"dense": 21, "moe": 41}[kind]
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16 and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
    src_cfg = json.load(open(os.path.join(hf, "config.json")))
    out_cfg = json.load(open(os.path.join(back, "config.json")))
    extra = {"auto_map", "architectures"} if kind == "moe" else set()
    assert {k: v for k, v in out_cfg.items() if k not in extra} == \
        {k: v for k, v in src_cfg.items() if k not in extra}
    if kind == "moe":
        assert out_cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_tanuki.TanukiForCausalLM"
    for side in ("tokenizer_config.json", "generation_config.json"):
        assert open(os.path.join(hf, side)).read() == open(os.path.join(back, side)).read()


VERIFY = [("dense", dict(tp=1)), ("dense", dict(tp=2)), ("dense", dict(pp=2)),
          ("moe", dict(ep=2)), ("moe", dict(tp=2)), ("moe", dict(pp=2))]


@pytest.mark.parametrize("kind,layout", VERIFY, ids=[f"{k}-{'-'.join(f'{a}{b}' for a, b in l.items())}"
                                                     for k, l in VERIFY])
def test_verify_layouts(ckpts, kind, layout):
    hf, mc, _ = ckpts[kind]
    args = [f"--{k}={v}" for k, v in layout.items()]
    r = json.loads(tanuki("convert", "verify", "--hf", hf, "--ckpt", mc, *args, "--json").stdout)
    assert r["ok"] and r["top1_agreement"] == 1.0 and r["max_abs_diff"] <= 1e-4, r
    assert r["world_size"] == 2 or layout == {"tp": 1}


def test_exported_moe_loads_as_tanuki_with_trust_remote_code(ckpts):
    from transformers import AutoModelForCausalLM

    from megatron_tanuki.models.tanuki.hf import load_remote_code_classes

    hf, _, back = ckpts["moe"]
    model = AutoModelForCausalLM.from_pretrained(back, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(model).__name__ == "TanukiForCausalLM"
    assert type(model.model.layers[0].mlp.gate).__name__ == "TanukiTopKRouter"
    _, cls = load_remote_code_classes()
    ref = cls.from_pretrained(hf, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 13414, 282, 483, 275, 1425, 427, 274]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    # never silently a Mixtral: without remote code, transformers refuses the folder
    with pytest.raises(ValueError, match="contains custom code which must be executed"):
        AutoModelForCausalLM.from_pretrained(back, trust_remote_code=False)


def test_verify_exits_nonzero_beyond_tolerance(ckpts):
    hf, mc, _ = ckpts["dense"]
    r = tanuki("convert", "verify", "--hf", hf, "--ckpt", mc, "--tolerance", "-1", check=False)
    assert r.returncode == 1 and r.stdout.startswith("verify FAILED"), r.stdout + r.stderr


def test_moe_round_trip_through_grouped_gemm_experts(ckpts, single_process, tmp_path):
    """HF -> mcore, loaded into a model with grouped-GEMM experts, saved from it, -> HF: bit-exact."""
    import shutil

    from megatron.core import dist_checkpointing

    from megatron_tanuki.convert.verify import load_checkpoint
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.checkpoint_meta import read_meta
    from megatron_tanuki.models.common.grouped_experts import GroupedGemmMLP
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.runtime.distributed import ParallelLayout

    hf, mc, _ = ckpts["moe"]
    cfg = read_meta(mc)[0]
    chunks = registry.build(cfg, ParallelLayout(), BuildOptions(dtype="bf16", perform_initialization=False,
                                                                moe_grouped_gemm=True))
    assert type(chunks[0].decoder.layers[0].mlp.experts) is GroupedGemmMLP
    load_checkpoint(chunks, mc)
    saved, back = tmp_path / "grouped-mcore", str(tmp_path / "grouped-back")
    shutil.copytree(mc, saved, ignore=shutil.ignore_patterns("*.distcp", "metadata.json", ".metadata"))
    dist_checkpointing.save(chunks[0].sharded_state_dict(), str(saved))
    tanuki("convert", "mcore-to-hf", "--ckpt", str(saved), "--out", back)
    a, b = tensors(hf), tensors(back)
    assert a.keys() == b.keys() and len(a) == 41
    for k in a:
        assert torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
