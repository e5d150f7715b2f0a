"""LLaVA-JP's forward pass assembled from transformers parts: the HF side of parity checks.

SiglipVisionModel (``hidden_states[select_layer]``, token 0 dropped) -> S2 -> Linear/GELU/Linear ->
LlamaForCausalLM or our HF TanukiForCausalLM on ``inputs_embeds``, with the image features spliced
in at the ``-200`` placeholder the way LLaVA-JP's prepare_inputs_labels_for_multimodal does (text
split at the placeholder, features inserted between the pieces), independent of our own
placeholder expansion.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_tanuki.data.templates import IMAGE_TOKEN_ID
from megatron_tanuki.models.tanuki_vision.hf_config import siglip_to_hf
from megatron_tanuki.models.tanuki_vision.hf_map import TOWER_PREFIX, is_carried
from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig
from megatron_tanuki.models.vision.s2 import s2_features

_NOT_LLM_FIELDS = ("model_type", "architectures", "auto_map", "scales", "vision_config", "use_mm_proj",
                   "transformers_version", "_name_or_path", "torch_dtype", "dtype")


def _language_model(hf_config: dict, moe: bool, state: dict | None = None):
    """LlamaForCausalLM / our HF TanukiForCausalLM; with ``state`` (checkpoint names, e.g. Mixtral's
    per-expert w1/w2/w3) loaded through transformers' own key conversion, strictly."""
    fields = {k: v for k, v in hf_config.items() if k not in _NOT_LLM_FIELDS and not k.startswith("mm_")}
    if moe:
        from megatron_tanuki.models.tanuki.hf import load_remote_code_classes

        config_cls, model_cls = load_remote_code_classes()
    else:
        from transformers import LlamaConfig as config_cls, LlamaForCausalLM as model_cls
    if state is None:
        return model_cls(config_cls(**fields))
    model, info = model_cls.from_pretrained(None, config=config_cls(**fields), state_dict=state,
                                            dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"language model tensors do not fit {model_cls.__name__}: {bad}")
    return model


class LlavaJpReference(nn.Module):
    def __init__(self, cfg: TanukiVisionConfig, hf_config: dict, llm_state: dict | None = None):
        from transformers import SiglipVisionConfig, SiglipVisionModel

        super().__init__()
        self.cfg = cfg
        self.vision_tower = SiglipVisionModel(SiglipVisionConfig(**siglip_to_hf(cfg.vision)))
        h = cfg.llm.hidden_size
        self.mm_projector = nn.Sequential(nn.Linear(cfg.projector_input_size, h), nn.GELU(), nn.Linear(h, h))
        self.llm = _language_model(hf_config, cfg.is_moe, llm_state)

    @classmethod
    def from_source(cls, cfg: TanukiVisionConfig, src) -> "LlavaJpReference":
        """Every tensor of a LLaVA-JP source (convert/sources.py) into its transformers module, strictly."""
        parts = {"vision_tower": {}, "mm_projector": {}, "llm": {}}
        for name in src.names():
            if name.startswith(TOWER_PREFIX):
                parts["vision_tower"][name.removeprefix(TOWER_PREFIX)] = src.get(name).float()
            elif name.startswith("model.mm_projector."):
                parts["mm_projector"][name.removeprefix("model.mm_projector.")] = src.get(name).float()
            elif not name.endswith("rotary_emb.inv_freq"):
                parts["llm"][name] = src.get(name).float()
        model = cls(cfg, src.config, parts.pop("llm")).float()
        if not any(k.startswith("vision_model.") for k in model.vision_tower.state_dict()):
            # transformers 5 names SiglipVisionModel's tensors without the 4.x "vision_model." level
            parts["vision_tower"] = {k.removeprefix("vision_model."): v for k, v in parts["vision_tower"].items()}
        model.mm_projector.load_state_dict(parts["mm_projector"], strict=True)
        missing, unexpected = model.vision_tower.load_state_dict(parts["vision_tower"], strict=False)
        used = [k for k in missing if not is_carried(TOWER_PREFIX + "vision_model." + k.removeprefix("vision_model."), cfg)]
        if used or unexpected:
            raise ValueError(f"vision tower tensors do not fit SiglipVisionModel: missing {used[:3]}, "
                             f"unexpected {unexpected[:3]}")
        # Tensors the LLaVA-JP forward never reads (last layer, post LayerNorm, head) may be absent:
        # a checkpoint trained here from scratch has none to carry.
        return model.eval()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        v = self.cfg.vision

        def tower(x):
            hidden = self.vision_tower(pixel_values=x, output_hidden_states=True).hidden_states[v.select_layer]
            return hidden[:, 1:] if v.drop_first_token else hidden

        return self.mm_projector(s2_features(tower, images, self.cfg.s2))

    def forward(self, ids: list[int], images: torch.Tensor | None = None) -> torch.Tensor:
        """One sequence with its ``<image>`` placeholders (unexpanded) -> logits [1, s, vocab]."""
        embed = self.llm.get_input_embeddings()
        pieces, current = [], []
        for t in ids:
            if t == IMAGE_TOKEN_ID:
                pieces.append(current)
                current = []
            else:
                current.append(t)
        pieces.append(current)
        if len(pieces) - 1 != (0 if images is None else images.shape[0]):
            raise ValueError(f"{len(pieces) - 1} <image> placeholders for "
                             f"{0 if images is None else images.shape[0]} images")
        feats = self.image_features(images) if images is not None else None
        parts = []
        for i, piece in enumerate(pieces):
            parts.append(embed(torch.tensor(piece, dtype=torch.long)))
            if i < len(pieces) - 1:
                parts.append(feats[i])
        return self.llm(inputs_embeds=torch.cat(parts).unsqueeze(0)).logits
