"""The megatron-core SigLIP tower equals transformers' SiglipVisionModel with LLaVA-JP's selection."""
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from megatron_tanuki.convert import transforms
from megatron_tanuki.models.vision import hf_map
from megatron_tanuki.models.vision.siglip import SIGLIP_TINY, SiglipTower, transformer_config


def _hf_tiny(seed=0):
    torch.manual_seed(seed)
    c = SiglipVisionConfig(hidden_size=SIGLIP_TINY.hidden_size, intermediate_size=SIGLIP_TINY.ffn_hidden_size,
                           num_hidden_layers=SIGLIP_TINY.num_layers, num_attention_heads=SIGLIP_TINY.num_heads,
                           image_size=SIGLIP_TINY.image_size, patch_size=SIGLIP_TINY.patch_size,
                           layer_norm_eps=SIGLIP_TINY.norm_eps)
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


def test_features_equal_hf_hidden_states_minus_2_without_token_0(single_process):
    from megatron_tanuki.runtime.distributed import ParallelLayout

    hf = _hf_tiny()
    tower = SiglipTower(SIGLIP_TINY, transformer_config(SIGLIP_TINY, ParallelLayout())).eval()
    _load_from_hf(tower, hf.state_dict())
    assert len(tower.decoder.layers) == SIGLIP_TINY.num_layers - 1  # the last layer is never built
    assert tower.ln_post is None
    pixels = torch.randn(2, 3, SIGLIP_TINY.image_size, SIGLIP_TINY.image_size)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = tower(pixels)
    assert got.shape == ref.shape == (2, SIGLIP_TINY.num_features, SIGLIP_TINY.hidden_size)
    assert (got - ref).abs().max().item() <= 1e-5


def test_so400m_shape_gives_728_features_from_26_layers():
    from megatron_tanuki.models.vision.siglip import SIGLIP_SO400M

    assert SIGLIP_SO400M.layers_to_build == 26 and SIGLIP_SO400M.num_patches == 729
    assert SIGLIP_SO400M.num_features == 728
