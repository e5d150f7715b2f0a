"""The megatron-core SigLIP tower equals transformers' SiglipVisionModel with LLaVA-JP's selection."""
import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from megatron_tanuki.convert import transforms
from megatron_tanuki.models.vision import hf_map
from megatron_tanuki.models.vision.siglip import SIGLIP_TINY, SiglipTower, transformer_config


def _hf_tiny(seed=0, cfg=SIGLIP_TINY):
    torch.manual_seed(seed)
    c = SiglipVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                           num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                           image_size=cfg.image_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.norm_eps)
    return SiglipVisionModel(c).eval()


def _load_from_hf(tower, hf_state):
    heads, d = SIGLIP_TINY.num_heads, SIGLIP_TINY.hidden_size // SIGLIP_TINY.num_heads
    shape = transforms.Shape(heads, heads, d, 0, 0)  # ViT attention: one query group per head
    params = dict(tower.named_parameters())
    used = set()
    with torch.no_grad():
        for rule in hf_map.rules(SIGLIP_TINY.layers_to_build, prefix=""):
            params[rule.mcore].copy_(transforms.to_mcore(rule.transform, [hf_state[n] for n in rule.hf], shape))
            used.add(rule.mcore)
    assert used == set(params), set(params) - used


@pytest.mark.parametrize("image_size", [56, 62])  # 62 px: not a multiple of 14, like so400m's 384
def test_features_equal_hf_hidden_states_minus_2_without_token_0(single_process, image_size):
    from megatron_tanuki.runtime.distributed import ParallelLayout

    cfg = SIGLIP_TINY.replace(image_size=image_size)
    hf = _hf_tiny(cfg=cfg)
    tower = SiglipTower(cfg, transformer_config(cfg, ParallelLayout())).eval()
    _load_from_hf(tower, hf.state_dict())
    assert len(tower.decoder.layers) == SIGLIP_TINY.num_layers - 1  # the last layer is never built
    assert tower.ln_post is None
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = tower(pixels)
    assert got.shape == ref.shape == (2, SIGLIP_TINY.num_features, SIGLIP_TINY.hidden_size)
    assert (got - ref).abs().max().item() <= 1e-5


def test_so400m_shape_gives_728_features_from_26_layers():
    from megatron_tanuki.models.vision.siglip import SIGLIP_SO400M

    assert SIGLIP_SO400M.layers_to_build == 26 and SIGLIP_SO400M.num_patches == 729
    assert SIGLIP_SO400M.num_features == 728
