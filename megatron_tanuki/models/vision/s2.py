"""S2 multi-scale features as the seed team's modified s2wrapper computes them.

Input 768 px. For each scale s in (1.0, 0.5): resize the image to 768*s (bicubic, fp32), split it
into ceil(768*s / 384)^2 tiles of 384 (chessboard order: row by row), run the tower on every tile
(728 tokens each), read each tile's 728 tokens as a 26 x 28 grid (their change: 728 is not a
square), put the tiles back in place, area-interpolate the merged map to 26 x 28, and concatenate
the scales on channels: 728 tokens x (len(scales) * hidden) -- 2304 for SigLIP-so400m.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

GRID = (26, 28)  # how LLaVA-JP lays out SigLIP's 728 patch tokens


def grid_for(num_tokens: int) -> tuple[int, int]:
    """The most square (rows <= cols) factorization: 728 -> (26, 28), the seed team's choice."""
    rows = max(r for r in range(1, int(num_tokens ** 0.5) + 1) if num_tokens % r == 0)
    return rows, num_tokens // rows


def split_tiles(x: torch.Tensor, n: int) -> torch.Tensor:
    """[b, c, H, W] -> [n*n*b, c, H/n, W/n], tile (i, j) at batch block i*n + j."""
    b, c, h, w = x.shape
    th, tw = h // n, w // n
    return torch.cat([x[:, :, i * th:(i + 1) * th, j * tw:(j + 1) * tw] for i in range(n) for j in range(n)])


def merge_tiles(x: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of split_tiles on feature maps: [n*n*b, c, h, w] -> [b, c, n*h, n*w]."""
    b = x.shape[0] // (n * n)
    rows = [torch.cat([x[(i * n + j) * b:(i * n + j + 1) * b] for j in range(n)], dim=-1) for i in range(n)]
    return torch.cat(rows, dim=-2)


def s2_features(tower: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                scales: Sequence[float] = (1.0, 0.5), tile: int = 384, grid=GRID) -> torch.Tensor:
    """``tower``: [n, 3, tile, tile] -> [n, grid_h*grid_w, c]. Returns [b, grid_h*grid_w, c*len(scales)]."""
    b, _, size, _ = pixels.shape
    gh, gw = grid
    outs = []
    for s in scales:
        side = int(size * s)
        x = pixels if side == size else F.interpolate(
            pixels.float(), size=(side, side), mode="bicubic").to(pixels.dtype)
        n = math.ceil(side / tile)
        feats = tower(split_tiles(x, n))  # [n*n*b, gh*gw, c]
        maps = feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], gh, gw)
        merged = merge_tiles(maps, n)
        if merged.shape[-2:] != (gh, gw):
            merged = F.interpolate(merged.float(), size=(gh, gw), mode="area").to(merged.dtype)
        outs.append(merged)
    out = torch.cat(outs, dim=1)  # [b, c*len(scales), gh, gw]
    return out.flatten(2).transpose(1, 2)
