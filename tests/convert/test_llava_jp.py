"""LLaVA-JP (Tanuki-vision) checkpoints: conversion both ways, carried tower tensors, verify, bad input."""
import json
import os
import shutil

import pytest
import torch

from megatron_tanuki.convert.safetensors_io import CheckpointError
from megatron_tanuki.models.tanuki.hf_config import ConfigError
from tests.convert import tiny_llava
from tests.convert.test_convert import tanuki, tensors

TOWER = tiny_llava.TOWER + "vision_model."


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    base = tmp_path_factory.mktemp("llava")
    moe = tiny_llava.build(str(base / "moe"), moe=True)  # tower inside the checkpoint
    dense = tiny_llava.build(str(base / "dense"), moe=False, tower_inside=False)  # tower in its own folder
    out = {"moe": moe, "dense": dense}
    for kind, paths in out.items():
        paths["mcore"], paths["back"] = str(base / kind / "mcore"), str(base / kind / "back")
        extra = ["--vision", paths["siglip"]] if kind == "dense" else []
        tanuki("convert", "hf-to-mcore", "--hf", paths["llava"], "--out", paths["mcore"], *extra)
        tanuki("convert", "mcore-to-hf", "--ckpt", paths["mcore"], "--out", paths["back"])
    return out


def test_round_trip_is_bit_exact_with_the_unused_tower_tensors_carried(vlm):
    p = vlm["moe"]
    src, back = tensors(p["llava"]), tensors(p["back"])
    assert sorted(src) == sorted(back)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    carried = set(tensors(os.path.join(p["mcore"], "carried")))
    last = 2  # SIGLIP_TINY: 3 layers, features after layer 2 -> layer index 2 is never computed
    assert TOWER + f"encoder.layers.{last}.mlp.fc1.weight" in carried
    assert TOWER + "post_layernorm.weight" in carried and TOWER + "head.probe" in carried
    assert not any(".layers.1." in n for n in carried)
    cfg_src = json.load(open(os.path.join(p["llava"], "config.json")))
    cfg_back = json.load(open(os.path.join(p["back"], "config.json")))
    for key in ("model_type", "mm_projector_type", "mm_hidden_size", "mm_vision_select_layer",
                "mm_vision_select_feature", "scales", "mm_vision_tower", "num_local_experts"):
        assert cfg_back[key] == cfg_src[key], key
    assert cfg_back["vision_config"]["num_hidden_layers"] == 3  # self-contained: re-importable anywhere


def test_separate_vision_folder_is_embedded_on_export(vlm):
    p = vlm["dense"]
    src, vit, back = tensors(p["llava"]), tensors(p["siglip"]), tensors(p["back"])
    expected = {**src, **{tiny_llava.TOWER + k: v for k, v in vit.items()}}
    assert sorted(back) == sorted(expected)
    assert all(torch.equal(back[n], t) for n, t in expected.items())
    meta = json.load(open(os.path.join(p["mcore"], "tanuki.json")))
    assert meta["model"]["kind"] == "tanuki-vision" and meta["model"]["llm"]["num_experts"] is None
    assert meta["model"]["s2_grid"] == [3, 5] and meta["model"]["s2_scales"] == [1.0, 0.5]


def test_exported_folder_converts_again_to_the_same_checkpoint(vlm, tmp_path):
    p = vlm["moe"]
    again = str(tmp_path / "again")
    tanuki("convert", "hf-to-mcore", "--hf", p["back"], "--out", again)
    m1 = json.load(open(os.path.join(p["mcore"], "tanuki.json")))["model"]
    m2 = json.load(open(os.path.join(again, "tanuki.json")))["model"]
    assert m1 == m2


@pytest.mark.parametrize("layout", [[], ["--tp", "2"], ["--pp", "2"]], ids=["tp1", "tp2", "pp2"])
def test_verify_vlm_with_generated_image(vlm, layout):
    p = vlm["moe"]
    r = tanuki("convert", "verify", "--hf", p["llava"], "--ckpt", p["mcore"], *layout, "--json")
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["ok"] and res["images"] == 1 and res["top1_agreement"] == 1.0
    assert res["max_abs_diff"] <= 1e-4


def test_verify_dense_vlm_from_separate_tower_with_an_image_file(vlm, tmp_path):
    from megatron_tanuki.data.images import sample_image

    p = vlm["dense"]
    img = str(tmp_path / "x.png")
    sample_image(300).transpose(0).save(img)  # mirrored, another size: resized like SigLIP's processor
    r = tanuki("convert", "verify", "--hf", p["llava"], "--vision", p["siglip"], "--ckpt", p["mcore"],
               "--image", img)
    assert "verify OK" in r.stdout and "+ 1 image" in r.stdout


def _edit_config(src: str, dst: str, **changes) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))
    return dst


def test_bad_llava_configs_name_the_field(vlm, tmp_path):
    from megatron_tanuki.convert.sources import open_source

    p = vlm["moe"]
    bad = _edit_config(p["llava"], str(tmp_path / "linear"), mm_projector_type="linear")
    with pytest.raises(ConfigError, match="mm_projector_type 'linear'"):
        open_source(bad)
    bad = _edit_config(p["llava"], str(tmp_path / "hidden"), mm_hidden_size=999)
    with pytest.raises(ConfigError, match="mm_hidden_size 999 != SigLIP hidden 32 x 2 scales"):
        open_source(bad)
    bad = _edit_config(p["llava"], str(tmp_path / "hub"), mm_vision_tower="someone/unknown-siglip")
    with pytest.raises(ConfigError, match="'someone/unknown-siglip' is neither a local SigLIP folder"):
        open_source(bad)
    with pytest.raises(CheckpointError, match="already holds the vision tower"):
        open_source(p["llava"], vision_dir=vlm["dense"]["siglip"])


def test_missing_tower_is_reported(vlm, tmp_path):
    from megatron_tanuki.convert.sources import open_source

    p = vlm["dense"]
    bad = _edit_config(p["llava"], str(tmp_path / "notower"), vision_config=json.load(
        open(os.path.join(p["siglip"], "config.json"))), mm_vision_tower="google/siglip-so400m-patch14-384")
    with pytest.raises(CheckpointError, match=r"no vision tower tensors \(model\.vision_tower\.vision_tower\.\*\)"):
        open_source(bad)
    r = tanuki("convert", "hf-to-mcore", "--hf", bad, "--out", str(tmp_path / "out"), check=False)
    assert r.returncode != 0 and "give it with --vision DIR" in r.stderr
    assert not os.path.exists(tmp_path / "out")


def test_verify_refuses_two_image_markers_for_one_image(vlm):
    r = tanuki("convert", "verify", "--hf", vlm["moe"]["llava"], "--ckpt", vlm["moe"]["mcore"],
               "--text", "<image>と<image>を比べて", check=False)
    assert r.returncode != 0 and "exactly one <image> for its one image, found 2" in r.stderr
