"""Whole Tanuki-vision logits equal an HF reference assembled from transformers parts.

Reference: SiglipVisionModel (hidden_states[-2][:, 1:]) -> S2 -> nn.Sequential projector ->
LlamaForCausalLM(inputs_embeds). Ours: SiglipTower -> S2 -> MultimodalProjector -> GPTModel, with the
same weights. Two images of different content, texts of different lengths (right padded).
"""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_tanuki.convert import transforms
from megatron_tanuki.models.tanuki import hf_map as llm_map
from megatron_tanuki.models.tanuki.config import TANUKI_8B_TINY
from megatron_tanuki.models.tanuki_vision.model import (
    IMAGE_TOKEN_ID, TanukiVisionConfig, TanukiVisionModel, expand_image_tokens)
from megatron_tanuki.models.vision.projector import HF_NAMES, build_projector
from megatron_tanuki.models.vision.s2 import s2_features
from megatron_tanuki.models.vision.siglip import SIGLIP_TINY, SiglipTower, transformer_config
from tests.vision.test_siglip_tower import _hf_tiny, _load_from_hf

CFG = TanukiVisionConfig("tanuki-vision-tiny", TANUKI_8B_TINY.replace(num_layers=2), SIGLIP_TINY,
                         s2_grid=(3, 5))


def _hf_llm():
    c = CFG.llm
    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_query_groups, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False)).eval()


def _load_llm(gpt, hf_state):
    c = CFG.llm
    shape = transforms.Shape(c.num_attention_heads, c.num_query_groups, c.head_dim, c.vocab_size, c.vocab_size)
    params = dict(gpt.named_parameters())
    with torch.no_grad():
        for rule in llm_map.rules(c.num_layers, None):
            params[rule.mcore].copy_(transforms.to_mcore(rule.transform, [hf_state[n] for n in rule.hf], shape))


def _batch():
    a, _ = expand_image_tokens([1, 500, IMAGE_TOKEN_ID, 600, 700, 800], None, CFG.num_image_tokens)
    b, _ = expand_image_tokens([1, IMAGE_TOKEN_ID, 900, 901], None, CFG.num_image_tokens)
    n = max(len(a), len(b))
    ids = torch.tensor([a + [3] * (n - len(a)), b + [3] * (n - len(b))])
    valid = torch.tensor([[1] * len(a) + [0] * (n - len(a)), [1] * len(b) + [0] * (n - len(b))]).bool()
    torch.manual_seed(2)
    images = torch.stack([torch.rand(3, 112, 112) * 2 - 1, -(torch.rand(3, 112, 112) * 2 - 1) ** 2])
    return ids, valid, images


def test_tanuki_vision_logits_equal_hf_reference(single_process):
    from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model
    from megatron_tanuki.runtime.distributed import ParallelLayout

    hf_vit, hf_llm = _hf_tiny(), _hf_llm()
    torch.manual_seed(3)
    hf_proj = torch.nn.Sequential(torch.nn.Linear(CFG.projector_input_size, CFG.llm.hidden_size),
                                  torch.nn.GELU(), torch.nn.Linear(CFG.llm.hidden_size, CFG.llm.hidden_size))
    ids, valid, images = _batch()

    def hf_tower(x):
        return hf_vit(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]

    with torch.no_grad():
        feats = hf_proj(s2_features(hf_tower, images, CFG.s2_scales, CFG.vision.image_size, CFG.s2_grid))
        emb = hf_llm.model.embed_tokens(ids.clamp(min=0))
        emb[ids == IMAGE_TOKEN_ID] = feats.reshape(-1, feats.shape[-1])
        ref = hf_llm(inputs_embeds=emb).logits

    layout = ParallelLayout()
    gpt = build_model(CFG.llm, layout, BuildOptions(dtype="fp32"))[0]
    _load_llm(gpt, hf_llm.state_dict())
    tower = SiglipTower(SIGLIP_TINY, transformer_config(SIGLIP_TINY, layout))
    _load_from_hf(tower, hf_vit.state_dict())
    proj = build_projector(CFG.projector_input_size, CFG.llm.hidden_size, layout)
    params = dict(proj.named_parameters())
    with torch.no_grad():
        for hf_name, name in HF_NAMES.items():
            params[name].copy_(hf_proj.state_dict()[hf_name.removeprefix("model.mm_projector.")])
    model = TanukiVisionModel(CFG, gpt, tower, proj).eval()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        got = model(ids, pos, None, images=images)
    assert got.shape == ref.shape
    diff = (got - ref).abs()[valid].max().item()
    assert diff <= 1e-4, diff
    assert torch.equal(got.argmax(-1)[valid], ref.argmax(-1)[valid])
    assert not torch.allclose(got[0, 2], got[1, 1])  # the two images differ where they sit


def _tiny_model():
    from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model
    from megatron_tanuki.runtime.distributed import ParallelLayout

    layout = ParallelLayout()
    gpt = build_model(CFG.llm, layout, BuildOptions(dtype="fp32"))[0]
    tower = SiglipTower(SIGLIP_TINY, transformer_config(SIGLIP_TINY, layout))
    return TanukiVisionModel(CFG, gpt, tower, build_projector(CFG.projector_input_size, CFG.llm.hidden_size, layout))


def _trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_stage_switches_keep_the_tower_frozen(single_process):
    m = _tiny_model()
    assert _trainable(m.vision_model) == 0
    m.set_trainable(projector=True, language_model=False)  # stage 1
    assert _trainable(m) == _trainable(m.vision_projection) == sum(p.numel() for p in m.vision_projection.parameters())
    m.set_trainable(projector=True, language_model=True)  # stage 2
    assert _trainable(m.vision_model) == 0
    assert _trainable(m) == _trainable(m.vision_projection) + sum(p.numel() for p in m.language_model.parameters())


def test_placeholders_without_images_are_refused(single_process):
    import pytest

    m = _tiny_model().eval()
    ids, _, images = _batch()
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    with pytest.raises(ValueError, match="30 image positions in the batch but no images"):
        m(ids, pos, None)
    with pytest.raises(ValueError, match="30 image positions for 1 images of 15 tokens"):
        m(ids, pos, None, images=images[:1])


def test_model_info_reports_parts_and_counts_match_built_modules(single_process):
    from megatron_tanuki.models.registry import model_info
    from megatron_tanuki.models.tanuki_vision.model import projector_parameter_count

    m = _tiny_model()
    n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert SIGLIP_TINY.parameter_count() == n(m.vision_model)
    assert projector_parameter_count(CFG) == n(m.vision_projection)
    info = model_info("tanuki-vision-8x8b")
    parts = info["parts"]
    assert parts["language"] == 46_973_325_312 and parts["vision"] == 397_745_440
    assert parts["projector"] == 2304 * 4096 + 4096 + 4096 * 4096 + 4096
    assert info["parameters"]["total"] == sum(parts.values())
