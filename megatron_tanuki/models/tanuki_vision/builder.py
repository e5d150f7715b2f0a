"""Build Tanuki-vision chunks for this rank: vision tower and projector on the first pipeline stage."""
from __future__ import annotations

from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model, place, target_device
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
            with target_device(device):
                tower = siglip.SiglipTower(cfg.vision, siglip.transformer_config(cfg.vision, layout, dtype))
                proj = build_projector(cfg.projector_input_size, cfg.llm.hidden_size, layout, dtype)
        # The whole model, tower and projector included, onto the rank's device (GPU in a real run).
        chunks.append(place(TanukiVisionModel(cfg, gpt, tower, proj), device))
    return chunks
