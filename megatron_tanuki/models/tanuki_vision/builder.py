"""Build Tanuki-vision chunks for this rank: vision tower and projector on the first pipeline stage."""
from __future__ import annotations

import contextlib

import torch

from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model
from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig, TanukiVisionModel
from megatron_tanuki.models.vision import siglip
from megatron_tanuki.models.vision.projector import build_projector


def build_vlm(cfg: TanukiVisionConfig, layout, opts: BuildOptions | None = None,
              device: str | None = None) -> list[TanukiVisionModel]:
    """``device="meta"``: shapes and checkpoint keys only, as for the language model."""
    opts = opts or BuildOptions()
    dtype = opts.torch_dtype()
    chunks = []
    for gpt in build_model(cfg.llm, layout, opts, device=device):
        tower = proj = None
        if gpt.pre_process:
            with torch.device(device) if device else contextlib.nullcontext():
                tower = siglip.SiglipTower(cfg.vision, siglip.transformer_config(cfg.vision, layout, dtype))
                proj = build_projector(cfg.projector_input_size, cfg.llm.hidden_size, layout, dtype)
        chunks.append(TanukiVisionModel(cfg, gpt, tower, proj))
    return chunks
