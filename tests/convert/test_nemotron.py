"""Nemotron-4: the NeMo zarr fixture and HF NemotronForCausalLM folders <-> megatron-core.

The fixture (tests/data/nemo-zarr-tiny) was written by megatron-core's own zarr strategy at TP=8. The
transformers reference is built here from the zarr tensors with plain torch (q/k/v cut out of the fused
per-group QKV by hand), not by our conversion tables, so the logits comparison checks the tables too.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from megatron_tanuki.convert import engine, nemo, verify
from megatron_tanuki.convert.nemo_zarr import NemoCheckpoint
from megatron_tanuki.convert.safetensors_io import CheckpointError
from megatron_tanuki.models import registry
from megatron_tanuki.models.tanuki.hf_config import ConfigError
from tests.convert.test_convert import tensors

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "nemo-zarr-tiny")
LAYERS, HIDDEN, HEADS, GROUPS, HEAD_DIM = 4, 64, 16, 8, 4


def reference_hf_folder(out: str) -> str:
    """A NemotronForCausalLM folder made from the zarr tensors by hand (fp32)."""
    src = NemoCheckpoint(FIXTURE)
    g = lambda n: src.get(n).float().contiguous()  # noqa: E731
    per = HEADS // GROUPS
    sd = {"model.embed_tokens.weight": g("embedding.word_embeddings.weight"),
          "lm_head.weight": g("output_layer.weight"),
          "model.norm.weight": g("decoder.final_layernorm.weight"), "model.norm.bias": g("decoder.final_layernorm.bias")}
    for i in range(LAYERS):
        p, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = g(p + "self_attention.linear_qkv.weight").view(GROUPS, per + 2, HEAD_DIM, HIDDEN)
        sd[hf + "self_attn.q_proj.weight"] = qkv[:, :per].reshape(-1, HIDDEN).contiguous()
        sd[hf + "self_attn.k_proj.weight"] = qkv[:, per].reshape(-1, HIDDEN).contiguous()
        sd[hf + "self_attn.v_proj.weight"] = qkv[:, per + 1].reshape(-1, HIDDEN).contiguous()
        sd[hf + "self_attn.o_proj.weight"] = g(p + "self_attention.linear_proj.weight")
        sd[hf + "mlp.up_proj.weight"] = g(p + "mlp.linear_fc1.weight")
        sd[hf + "mlp.down_proj.weight"] = g(p + "mlp.linear_fc2.weight")
        for b in ("weight", "bias"):
            sd[hf + f"input_layernorm.{b}"] = g(p + f"self_attention.linear_qkv.layer_norm_{b}")
            sd[hf + f"post_attention_layernorm.{b}"] = g(p + f"mlp.linear_fc1.layer_norm_{b}")
    os.makedirs(out)
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_type": "nemotron", "architectures": ["NemotronForCausalLM"], "vocab_size": 256,
           "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
           "num_key_value_heads": GROUPS, "intermediate_size": 128, "hidden_act": "relu2", "norm_eps": 1e-5,
           "max_position_embeddings": 64, "partial_rotary_factor": 0.5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "torch_dtype": "float32"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("nemotron")
    ck = str(base / "ck")
    stats = nemo.nemo_to_mcore(FIXTURE, ck, dtype="fp32")
    assert stats.tensors == 3 + 1 + LAYERS * 8  # embedding, output, final norm x2, 8 per layer
    back = str(base / "hf")
    engine.mcore_to_hf(ck, back)
    return ck, back, reference_hf_folder(str(base / "ref"))


def test_nemo_checkpoint_meta_and_side_files(converted):
    ck, _, _ = converted
    meta = json.load(open(os.path.join(ck, "tanuki.json")))
    assert meta["model"] == {**registry.get_preset("nemotron4-tiny").to_dict(), "name": "nemo-zarr-tiny"}
    assert meta["dtype"] == "fp32" and meta["hf_vocab_size"] == 256
    assert sorted(os.listdir(os.path.join(ck, "hf"))) == ["config.json", "model_config.yaml"]


def test_export_equals_hand_made_reference(converted):
    """mcore-to-hf of the converted NeMo checkpoint = the tensors cut by hand from the zarr arrays."""
    _, back, ref = converted
    a, b = tensors(back), tensors(ref)
    assert a.keys() == b.keys() and len(a) == 4 + LAYERS * 10
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", [dict(), dict(tp=2), dict(pp=2)], ids=["tp1", "tp2", "pp2"])
def test_logits_equal_transformers(converted, layout):
    ck, _, ref = converted
    r = verify.verify(ref, ck, **layout)
    assert r["ok"] and r["max_abs_diff"] <= 1e-4 and r["top1_agreement"] == 1.0, r


def test_hf_round_trip_bit_exact_and_loads_without_remote_code(tmp_path):
    from transformers import AutoModelForCausalLM, NemotronConfig, NemotronForCausalLM

    torch.manual_seed(0)
    cfg = NemotronConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)
    model = NemotronForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # non-trivial norms: zero-centred weights and biases
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.1)
    hf, mc, back = str(tmp_path / "hf"), str(tmp_path / "mc"), str(tmp_path / "back")
    model.save_pretrained(hf)
    engine.hf_to_mcore(hf, mc)
    meta = json.load(open(os.path.join(mc, "tanuki.json")))
    assert meta["model"]["kind"] == "nemotron4" and meta["model"]["vocab_size"] == 384  # padded to 128
    engine.mcore_to_hf(mc, back)
    a, b = tensors(hf), tensors(back)
    assert a.keys() == b.keys() and len(a) == 4 + 2 * 10
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)), k
    loaded = AutoModelForCausalLM.from_pretrained(back)  # no trust_remote_code
    assert type(loaded).__name__ == "NemotronForCausalLM"
    ids = torch.tensor([[5, 17, 250, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.to(torch.bfloat16)(ids).logits, model(ids).logits)


def test_layernorm1p_equals_transformers():
    from types import SimpleNamespace

    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P

    from megatron_tanuki.models.common.norm import LayerNorm1p

    torch.manual_seed(0)
    ours = LayerNorm1p(SimpleNamespace(params_dtype=torch.float32, sequence_parallel=False), 48)
    ref = NemotronLayerNorm1P(48, eps=1e-5)
    with torch.no_grad():
        for p in (ours.weight, ours.bias):
            p.normal_(0, 0.2)
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    x = torch.randn(3, 5, 48) * 4 + 1
    assert torch.equal(ours(x), ref(x))
    assert torch.equal(ours.weight, ref.weight)  # the stored weight is zero-centred on both sides


def _broken(tmp_path, edit):
    copy = tmp_path / "nemo"
    shutil.copytree(FIXTURE, copy)
    edit(copy)
    return str(copy), str(tmp_path / "out")


def _yaml_edit(old, new):
    """An edit for _broken: one text replacement in the copy's model_config.yaml."""
    def edit(d):
        (d / "model_config.yaml").write_text((d / "model_config.yaml").read_text().replace(old, new))
    return edit


def test_shape_disagreeing_with_yaml_is_named_and_leaves_nothing(tmp_path):
    src, out = _broken(tmp_path, _yaml_edit("ffn_hidden_size: 128", "ffn_hidden_size: 256"))
    with pytest.raises(CheckpointError) as e:
        nemo.nemo_to_mcore(src, out)
    assert str(e.value) == (f"{src}/model_weights/model.decoder.layers.mlp.linear_fc1.weight: tensor "
                            f"decoder.layers.0.mlp.linear_fc1.weight has shape [128, 64], model_config.yaml "
                            f"implies [256, 64]")
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["nemo"]


def test_missing_chunk_during_conversion_leaves_nothing(tmp_path):
    src, out = _broken(tmp_path, lambda d: os.remove(d / "model_weights" / "model.decoder.layers.mlp.linear_fc2.weight" / "3.0.5"))
    with pytest.raises(CheckpointError, match=r"tensor model\.decoder\.layers\.mlp\.linear_fc2\.weight chunk 3\.0\.5 is missing"):
        nemo.nemo_to_mcore(src, out)
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["nemo"]


def test_unsupported_normalization_is_named(tmp_path):
    src, out = _broken(tmp_path, _yaml_edit("normalization: layernorm1p", "normalization: rmsnorm"))
    with pytest.raises(ConfigError) as e:
        nemo.nemo_to_mcore(src, out)
    assert str(e.value) == (f"{src}/model_config.yaml: normalization = 'rmsnorm' is not supported for "
                            f"Nemotron-4 (expected 'layernorm1p')")
    assert not os.path.exists(out)


def test_model_info_counts():
    assert registry.model_info("nemotron4-340b")["parameters"]["total"] == 341_029_195_776
    # the Reward model: the same trunk plus rm_head [9, hidden] and its bias
    assert registry.model_info("nemotron4-340b-reward")["parameters"]["total"] == 341_029_195_776 + 9 * 18432 + 9
    info = registry.model_info("nemotron4-15b")
    per_layer = 6144 * (6144 + 2 * 8 * 128) + 6144 * 6144 + 2 * 6144 * 24576 + 4 * 6144
    assert info["parameters"]["total"] == 32 * per_layer + 2 * 256000 * 6144 + 2 * 6144


def test_tokenizer_named_by_the_yaml_is_copied_as_tokenizer_model(tmp_path):
    """The release names its tokenizer in model_config.yaml (``nemo:<hash>_nemotron_2_256k.model``);
    the checkpoint keeps it as hf/tokenizer.model, which generate / serve use by default."""
    from tests.unit.tiny_spm import make_nemotron_spm

    def edit(d):
        (d / "tok").mkdir()
        shutil.move(make_nemotron_spm(str(d / "tok")), d / "a1b2_nemotron_2_256k.model")
        (d / "tok").rmdir()
        _yaml_edit("  model: null", "  model: nemo:a1b2_nemotron_2_256k.model")(d)
    src, out = _broken(tmp_path, edit)
    nemo.nemo_to_mcore(src, out)
    assert sorted(os.listdir(os.path.join(out, "hf"))) == ["config.json", "model_config.yaml", "tokenizer.model"]
    with open(os.path.join(out, "hf", "tokenizer.model"), "rb") as a, open(os.path.join(src, "a1b2_nemotron_2_256k.model"), "rb") as b:
        assert a.read() == b.read()
    assert json.load(open(os.path.join(out, "tanuki.json")))["dtype"] == "bf16"  # the yaml's precision
