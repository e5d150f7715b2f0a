"""S2 multi-scale features as LLaVA-JP's s2wrapper computes them, from one geometry.

LLaVA-JP (the seed team's fork) resizes every image to ``tile x len(scales)`` pixels, where
``tile`` is the tower's own input size (384 for SigLIP-so400m). s2wrapper then, for each scale s:
resizes to ``int(input * s)`` (bicubic, fp32), splits that into ``ceil(side / tile)`` tiles per side
(chessboard order: row by row), runs the tower on every tile, reads each tile's tokens as a
``isqrt(n) x n / isqrt(n)`` grid (728 -> 26 x 28: their change, 728 is not a square), puts the tiles
back in place, area-interpolates the merged map to that grid, and concatenates the scales on
channels. So S2 at 768 px with (1.0, 0.5) runs the tower 4 + 1 times per image, and the later
recipe (siglip-base-patch16-256, (1.0, 0.6675, 0.334)) 9 + 4 + 1 times, also at 768 px.

Everything that depends on this (input size, tower runs for FLOPs, token count, the projector's
width) reads :class:`S2Geometry`, so there is one derivation. A scale list whose resized side is not
a whole number of tiles is refused: the tower would get tiles of another size, which SigLIP's fixed
position embeddings cannot take (LLaVA-JP itself fails or mis-reads such tiles).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


class S2GeometryError(ValueError):
    """A scale list / tower combination LLaVA-JP's s2wrapper cannot run exactly."""


def token_grid(num_tokens: int) -> tuple[int, int]:
    """LLaVA-JP's layout of a tile's tokens: ``isqrt(n)`` rows; it asserts the rows divide ``n``."""
    rows = math.isqrt(num_tokens)
    if rows == 0 or num_tokens % rows:
        raise S2GeometryError(
            f"the tower gives {num_tokens} tokens per tile; LLaVA-JP's s2wrapper lays them out as "
            f"isqrt({num_tokens}) = {rows} rows, which does not divide {num_tokens}")
    return rows, num_tokens // rows


NO_S2 = (1.0,)  # LLaVA-JP's ``scales: null``: the tower once on the tile-sized image


@dataclass(frozen=True)
class S2Geometry:
    """Where every S2 number comes from. ``tile``: the tower's input side; ``scales`` as in
    LLaVA-JP's config.json; ``num_tokens``: tower features per tile; ``input_size``: the side the
    image is resized to (LLaVA-JP: tile x len(scales))."""

    tile: int
    scales: tuple[float, ...]
    num_tokens: int
    input_size: int

    @classmethod
    def for_tower(cls, tile: int, num_tokens: int, scales: Sequence[float] = NO_S2) -> "S2Geometry":
        scales = tuple(float(s) for s in scales)
        return cls(tile, scales, num_tokens, tile * len(scales))

    def __post_init__(self):
        if not self.scales or any(not s > 0 for s in self.scales):
            raise S2GeometryError(f"scales {list(self.scales)}: need at least one scale, all positive")
        for s, side, n in zip(self.scales, self.sides, self.splits):
            if n < 1 or side != n * self.tile:
                raise S2GeometryError(
                    f"scale {s:g} resizes the {self.input_size}-px input to {side} px, which is not a whole "
                    f"number of {self.tile}-px tower tiles (s2wrapper would cut {n} x {n} tiles of "
                    f"{side / max(n, 1):g} px); use scales that give multiples of {self.tile} px")
        if self.is_s2:
            token_grid(self.num_tokens)  # refuses a token count LLaVA-JP cannot lay out

    @property
    def is_s2(self) -> bool:
        return self.scales != NO_S2

    @property
    def sides(self) -> tuple[int, ...]:
        """Resized side per scale, computed as s2wrapper does: ``int(input_size * scale)``."""
        return tuple(int(self.input_size * s) for s in self.scales)

    @property
    def splits(self) -> tuple[int, ...]:
        """Tiles per side per scale: ``ceil(side / tile)``."""
        return tuple(math.ceil(side / self.tile) for side in self.sides)

    @property
    def tower_runs(self) -> int:
        """Tower forwards (tiles) per image: the sum of splits squared."""
        return sum(n * n for n in self.splits)

    @property
    def grid(self) -> tuple[int, int]:
        """Output token grid. Without S2 no layout is needed, so any token count goes as 1 x n."""
        return token_grid(self.num_tokens) if self.is_s2 else (1, self.num_tokens)

    @property
    def output_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


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
                geometry: S2Geometry | Sequence[float], tile: int | None = None, grid=None) -> torch.Tensor:
    """``tower``: [n, 3, tile, tile] -> [n, num_tokens, c]. ``pixels``: [b, 3, input, input].
    Returns [b, output_tokens, c * len(scales)].

    The older call ``s2_features(tower, pixels, scales, tile, grid)`` still works: the geometry is
    then built from the pixels' side, as s2wrapper does."""
    if not isinstance(geometry, S2Geometry):
        geometry = S2Geometry(int(tile), tuple(float(s) for s in geometry), grid[0] * grid[1], pixels.shape[-1])
    g = geometry
    b, _, h, w = pixels.shape
    if h != w or h != g.input_size:
        raise ValueError(f"S2 expects {g.input_size} x {g.input_size} images (tile {g.tile} x "
                         f"{len(g.scales)} scales), got {h} x {w}")
    gh, gw = g.grid
    outs = []
    for side, n in zip(g.sides, g.splits):
        # bicubic to the same size is the identity, so it is skipped there
        x = pixels if side == h else F.interpolate(
            pixels.float(), size=(side, side), mode="bicubic").to(pixels.dtype)
        feats = tower(split_tiles(x, n))  # [n*n*b, gh*gw, c]
        maps = feats.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], gh, gw)
        merged = merge_tiles(maps, n)
        if merged.shape[-2:] != (gh, gw):
            merged = F.interpolate(merged.float(), size=(gh, gw), mode="area").to(merged.dtype)
        outs.append(merged)
    out = torch.cat(outs, dim=1)  # [b, c*len(scales), gh, gw]
    return out.flatten(2).transpose(1, 2)
