"""Tanuki-vision presets (data): SigLIP-so400m + S2 + mlp2x_gelu on Tanuki-8B / Tanuki-8x8B.

The S2 geometry (768 px input, 26 x 28 token grid, 5 tower runs per image) is derived from the
tower and the scales (``TanukiVisionConfig.s2``), never written here.
"""
from megatron_tanuki.models.tanuki.config import TANUKI_8B, TANUKI_8B_TINY, TANUKI_8X8B, TANUKI_8X8B_TINY
from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig
from megatron_tanuki.models.vision.siglip import SIGLIP_SO400M, SIGLIP_TINY

# The 8x8B-vision-exp started from an MoE checkpoint with rope theta 10000 and 2048 positions:
# per run, replace(llm=TANUKI_8X8B.replace(rope_theta=10000.0, max_position_embeddings=2048)).
TANUKI_VISION_8B = TanukiVisionConfig("tanuki-vision-8b", TANUKI_8B, SIGLIP_SO400M)
TANUKI_VISION_8X8B = TanukiVisionConfig("tanuki-vision-8x8b", TANUKI_8X8B, SIGLIP_SO400M)
TANUKI_VISION_8B_TINY = TanukiVisionConfig("tanuki-vision-8b-tiny", TANUKI_8B_TINY, SIGLIP_TINY)
TANUKI_VISION_8X8B_TINY = TanukiVisionConfig("tanuki-vision-8x8b-tiny", TANUKI_8X8B_TINY, SIGLIP_TINY)

PRESETS = {c.name: c for c in (TANUKI_VISION_8B, TANUKI_VISION_8X8B, TANUKI_VISION_8B_TINY,
                               TANUKI_VISION_8X8B_TINY)}
