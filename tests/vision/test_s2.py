"""S2 multi-scale features equal a straightforward reference of the seed algorithm."""
import math

import torch
import torch.nn.functional as F

from megatron_tanuki.models.vision.s2 import merge_tiles, s2_features, split_tiles


def _reference(tower, img, scales, tile, gh, gw):
    """Loop version: each tile by itself, placed on a canvas by (row, col), then area-resized."""
    per_scale = []
    size = img.shape[-1]
    for s in scales:
        side = int(size * s)
        x = img if side == size else F.interpolate(img.float(), size=(side, side), mode="bicubic")
        n = math.ceil(side / tile)
        c = None
        canvas = None
        for i in range(n):
            for j in range(n):
                t = x[:, :, i * tile:(i + 1) * tile, j * tile:(j + 1) * tile]
                f = tower(t)  # [b, gh*gw, c]
                c = f.shape[-1]
                if canvas is None:
                    canvas = torch.zeros(img.shape[0], c, n * gh, n * gw)
                canvas[:, :, i * gh:(i + 1) * gh, j * gw:(j + 1) * gw] = f.transpose(1, 2).reshape(-1, c, gh, gw)
        per_scale.append(F.adaptive_avg_pool2d(canvas, (gh, gw)))  # area == exact block mean here
    return torch.cat(per_scale, 1).flatten(2).transpose(1, 2)


def _fake_tower(gh, gw, c=5):
    """A position- and content-sensitive stand-in: conv features pooled onto a gh x gw grid."""
    torch.manual_seed(0)
    w = torch.randn(c, 3, 3, 3)

    def tower(x):
        y = F.conv2d(x, w, padding=1)
        y = F.adaptive_avg_pool2d(y, (gh, gw))
        return y.flatten(2).transpose(1, 2)

    return tower


def test_split_merge_are_inverse_and_row_major():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    tiles = split_tiles(x, 2)
    assert tiles.shape == (8, 1, 2, 2)
    assert torch.equal(tiles[2:4], x[:, :, 0:2, 2:4])  # tile (0, 1) is the second batch block
    assert torch.equal(merge_tiles(tiles, 2), x)


def test_s2_equals_reference_on_728_token_grid():
    gh, gw = 26, 28
    tower = _fake_tower(gh, gw)
    img = torch.randn(2, 3, 64, 64)  # 2 images of different content; tile 32 -> scale 1.0 is 2x2 tiles
    got = s2_features(tower, img, scales=(1.0, 0.5), tile=32, grid=(gh, gw))
    ref = _reference(tower, img, (1.0, 0.5), 32, gh, gw)
    assert got.shape == (2, 728, 10)
    assert (got - ref).abs().max().item() <= 1e-5
    assert not torch.allclose(got[0], got[1])
