"""One S2 geometry for the whole of Tanuki-vision: config, conversion, model forward and FLOPs agree
for any scale list LLaVA-JP runs (here the fork's 3-scale recipe), and refuse the others by name."""
import json

import pytest
import torch

from megatron_tanuki.models.tanuki.hf_config import ConfigError
from megatron_tanuki.models.tanuki_vision.hf_config import from_llava_jp_config, siglip_to_hf, to_llava_jp_config
from megatron_tanuki.models.tanuki_vision.model import IMAGE_TOKEN_ID, TanukiVisionConfig, expand_image_tokens
from megatron_tanuki.models.tanuki_vision.presets import TANUKI_VISION_8B_TINY, TANUKI_VISION_8X8B
from megatron_tanuki.models.vision.siglip import SiglipConfig
from tests.vision.test_s2 import RECIPE_3, seed_reference

# google/siglip-base-patch16-256, the tower of the fork's later recipe
SIGLIP_BASE_256 = SiglipConfig(name="siglip-base-patch16-256", hidden_size=768, num_layers=12, num_heads=12,
                               ffn_hidden_size=3072, patch_size=16, image_size=256)
TINY3 = TANUKI_VISION_8B_TINY.replace(llm=TANUKI_VISION_8B_TINY.llm.replace(num_layers=2), s2_scales=RECIPE_3)


def _llava_jp_config(vision: SiglipConfig, scales) -> dict:
    hf = to_llava_jp_config(TANUKI_VISION_8B_TINY)
    return {**hf, "vision_config": siglip_to_hf(vision), "scales": scales,
            "mm_hidden_size": vision.hidden_size * (len(scales) if scales else 1)}


def test_config_derives_input_size_tokens_and_width_from_the_scales():
    assert (TANUKI_VISION_8X8B.image_size, TANUKI_VISION_8X8B.s2_grid, TANUKI_VISION_8X8B.s2.tower_runs) == \
        (768, (26, 28), 5)
    assert (TINY3.image_size, TINY3.s2_grid, TINY3.num_image_tokens, TINY3.projector_input_size) == (168, (3, 5), 15, 96)
    assert TINY3.s2.splits == (3, 2, 1)
    saved = json.loads(json.dumps(TINY3.to_dict()))  # as tanuki.json holds it
    assert saved["s2_grid"] == [3, 5] and TanukiVisionConfig.from_dict(saved) == TINY3
    stale = {**saved, "s2_grid": [26, 28]}
    with pytest.raises(ValueError, match=r"s2_grid \[26, 28\] disagrees with the 3 x 5 grid derived from the "
                                         r"tower \(15 tokens per tile\)"):
        TanukiVisionConfig.from_dict(stale)


def test_llava_jp_3_scale_recipe_converts_with_its_geometry():
    cfg = from_llava_jp_config(_llava_jp_config(SIGLIP_BASE_256, list(RECIPE_3)), "llava/config.json")
    assert cfg.s2_scales == RECIPE_3 and cfg.image_size == 768  # 256 x 3, as LLaVA-JP resizes
    assert cfg.s2.splits == (3, 2, 1) and cfg.s2.tower_runs == 14
    assert cfg.s2_grid == (15, 17) and cfg.num_image_tokens == 255 and cfg.projector_input_size == 2304
    out = to_llava_jp_config(cfg)
    assert out["scales"] == list(RECIPE_3) and out["mm_hidden_size"] == 2304
    plain = from_llava_jp_config(_llava_jp_config(SIGLIP_BASE_256, None), "llava/config.json")
    assert (plain.image_size, plain.num_image_tokens) == (256, 255) and to_llava_jp_config(plain)["scales"] is None


def test_scale_lists_llava_jp_cannot_run_are_refused_at_conversion():
    with pytest.raises(ConfigError, match=r"^llava/config\.json: scales \[1\.0, 0\.75\] with a 256-px SigLIP tile: "
                       r"scale 0\.75 resizes the 512-px input to 384 px, which is not a whole number of 256-px "
                       r"tower tiles \(s2wrapper would cut 2 x 2 tiles of 192 px\); use scales that give "
                       r"multiples of 256 px$"):
        from_llava_jp_config(_llava_jp_config(SIGLIP_BASE_256, [1.0, 0.75]), "llava/config.json")
    with pytest.raises(ConfigError, match=r"^llava/config\.json: scales \[\]; expected null or a non-empty list"):
        from_llava_jp_config(_llava_jp_config(SIGLIP_BASE_256, []), "llava/config.json")
    # SigLIP's n x n patches minus token 0 are (n - 1) x (n + 1): LLaVA-JP's isqrt layout always fits
    odd = SIGLIP_BASE_256.replace(image_size=176)
    assert from_llava_jp_config(_llava_jp_config(odd, [1.0, 0.5]), "c.json").s2_grid == (10, 12)


def test_flops_count_the_tower_runs_the_geometry_makes():
    from megatron_tanuki import bench
    from megatron_tanuki.models import flops

    assert bench.model_flops_per_step is flops.model_flops_per_step and bench.vision_flops is flops.vision_flops
    # SigLIP-so400m (729 patches, 26 layers built) at 768 px: 4 + 1 tiles, forward only; projector 3 x
    assert flops.vision_flops(TANUKI_VISION_8X8B.vision, 1) == 640_813_814_784
    assert flops.image_flops(TANUKI_VISION_8X8B) == 5 * 640_813_814_784 + 114_504_499_200
    recipe = TanukiVisionConfig("recipe-3", TANUKI_VISION_8X8B.llm, SIGLIP_BASE_256, s2_scales=RECIPE_3)
    assert flops.image_flops(recipe) == 14 * flops.vision_flops(SIGLIP_BASE_256, 1) + flops.projector_flops(recipe)
    assert flops.projector_flops(recipe) == 3 * 2 * 255 * (2304 * 4096 + 4096 * 4096)
    llm = TINY3.llm
    text = flops.model_flops_per_step(llm, 2, 64, 1) + 3 * 2 * llm.hidden_size * llm.vocab_size * 64
    assert flops.flops_per_row(llm, 64) == flops.flops_per_row(TINY3, 64, images=0) == text
    assert flops.flops_per_row(TINY3, 64, images=2) == text + 2 * (14 * 589_824 + flops.projector_flops(TINY3))


def test_whole_model_with_3_scales_equals_the_hf_reference(single_process):
    """TanukiVisionModel (built by build_vlm) on the tiny preset with the 3-scale recipe against
    transformers' SigLIP -> the seed loop S2 -> projector -> LlamaForCausalLM, same weights."""
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.models.tanuki_vision.builder import build_vlm
    from megatron_tanuki.models.vision.projector import HF_NAMES
    from megatron_tanuki.runtime.distributed import ParallelLayout
    from tests.vision.test_siglip_tower import _hf_tiny, _load_from_hf
    from tests.vision.test_tanuki_vision_parity import _hf_llm, _load_llm  # the same 2-layer tiny LLM

    cfg = TINY3
    hf_vit, hf_llm = _hf_tiny(), _hf_llm()
    h = cfg.llm.hidden_size
    torch.manual_seed(3)
    hf_proj = torch.nn.Sequential(torch.nn.Linear(cfg.projector_input_size, h), torch.nn.GELU(), torch.nn.Linear(h, h))
    a, _ = expand_image_tokens([1, 500, IMAGE_TOKEN_ID, 600, 700, 800], None, cfg.num_image_tokens)
    b, _ = expand_image_tokens([1, IMAGE_TOKEN_ID, 900, 901, 902, 903], None, cfg.num_image_tokens)
    ids = torch.tensor([a, b])
    torch.manual_seed(2)
    side = cfg.image_size  # 56 x 3 = 168
    images = torch.stack([torch.rand(3, side, side) * 2 - 1, -(torch.rand(3, side, side) * 2 - 1) ** 2])

    def hf_tower(x):
        return hf_vit(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]

    with torch.no_grad():
        feats = hf_proj(seed_reference(hf_tower, images, RECIPE_3, cfg.vision.image_size))
        assert feats.shape == (2, 15, h)
        emb = hf_llm.model.embed_tokens(ids.clamp(min=0))
        emb[ids == IMAGE_TOKEN_ID] = feats.reshape(-1, h)
        ref = hf_llm(inputs_embeds=emb).logits

    model = build_vlm(cfg, ParallelLayout(), BuildOptions(dtype="fp32"))[0].eval()
    _load_llm(model.language_model, hf_llm.state_dict())
    _load_from_hf(model.vision_model, hf_vit.state_dict())
    params = dict(model.vision_projection.named_parameters())
    with torch.no_grad():
        for hf_name, name in HF_NAMES.items():
            params[name].copy_(hf_proj.state_dict()[hf_name.removeprefix("model.mm_projector.")])
        got = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None, images=images)
    assert got.shape == ref.shape == (2, len(a), cfg.llm.vocab_size)
    assert (got - ref).abs().max().item() <= 1e-4
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert not torch.allclose(got[0, 2], got[1, 1])  # the two images differ where they sit


def test_3_scale_llava_jp_folder_converts_and_verifies(tmp_path):
    """The reported failure: a 3-scale LLaVA-JP folder converted, then `convert verify` died with a
    tensor-size mismatch. Now verify feeds both sides a 168-px image (56 x 3) and the logits agree."""
    from safetensors.torch import load_file, save_file

    from tests.convert import tiny_llava
    from tests.convert.test_convert import tanuki

    p = tiny_llava.build(str(tmp_path), moe=False)
    cfg_path, st_path = f"{p['llava']}/config.json", f"{p['llava']}/model.safetensors"
    hf = json.load(open(cfg_path))
    hf.update(scales=list(RECIPE_3), mm_hidden_size=32 * 3)
    json.dump(hf, open(cfg_path, "w"))
    state = load_file(st_path)
    w = state["model.mm_projector.0.weight"]  # [hidden, 32 x 2] -> [hidden, 32 x 3]
    state["model.mm_projector.0.weight"] = torch.cat([w, w[:, :32].flip(0)], dim=1).contiguous()
    save_file(state, st_path, metadata={"format": "pt"})

    mcore = str(tmp_path / "mcore")
    tanuki("convert", "hf-to-mcore", "--hf", p["llava"], "--out", mcore)
    meta = json.load(open(f"{mcore}/tanuki.json"))["model"]
    assert meta["s2_scales"] == list(RECIPE_3) and meta["s2_grid"] == [3, 5]
    r = tanuki("convert", "verify", "--hf", p["llava"], "--ckpt", mcore, "--json")
    res = json.loads(r.stdout[r.stdout.index("{"):])
    assert res["ok"] and res["images"] == 1 and res["top1_agreement"] == 1.0 and res["max_abs_diff"] <= 1e-4
