"""S2 multi-scale features equal a loop reference of the seed algorithm, for any scale list it runs;
the geometry (input size, tiles, token grid) is LLaVA-JP's, and the lists it cannot run are refused."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_tanuki.models.vision.s2 import S2Geometry, S2GeometryError, merge_tiles, s2_features, split_tiles

RECIPE_3 = (1.0, 0.6675, 0.334)  # the Tanuki-vision fork's later recipe (siglip-base-patch16-256)


def seed_reference(tower, img, scales, tile):
    """LLaVA-JP's s2wrapper, written out as loops: every scale resized (bicubic in fp32, also at
    scale 1.0) to int(input * s), cut into ceil(side / tile)^2 tiles, each tile run by itself and
    placed on a canvas by (row, col), the tokens read as isqrt(n) x n / isqrt(n), then each scale's
    canvas area-resized to that grid and the scales concatenated on channels."""
    size = img.shape[-1]
    per_scale, grid = [], None
    for s in scales:
        side = int(size * s)
        n = math.ceil(side / tile)
        x = F.interpolate(img.float(), size=side, mode="bicubic").to(img.dtype)
        t = side // n
        canvas = None
        for i in range(n):
            for j in range(n):
                f = tower(x[:, :, i * t:(i + 1) * t, j * t:(j + 1) * t])  # [b, tokens, c]
                if grid is None:
                    rows = int(f.shape[1] ** 0.5)
                    grid = (rows, f.shape[1] // rows)
                    assert grid[0] * grid[1] == f.shape[1]
                gh, gw = grid
                if canvas is None:
                    canvas = torch.zeros(img.shape[0], f.shape[-1], n * gh, n * gw, dtype=f.dtype)
                canvas[:, :, i * gh:(i + 1) * gh, j * gw:(j + 1) * gw] = f.transpose(1, 2).reshape(-1, f.shape[-1], gh, gw)
        per_scale.append(F.interpolate(canvas.float(), size=grid, mode="area").to(canvas.dtype))
    return torch.cat(per_scale, 1).flatten(2).transpose(1, 2)


def fake_tower(tile, gh, gw, c=5):
    """A position- and content-sensitive stand-in that, like SigLIP, takes only ``tile``-px inputs."""
    torch.manual_seed(0)
    w = torch.randn(c, 3, 3, 3)

    def tower(x):
        assert x.shape[-2:] == (tile, tile), x.shape
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


def test_geometry_of_the_two_shipped_recipes():
    so400m = S2Geometry.for_tower(384, 728, (1.0, 0.5))  # SigLIP-so400m, 729 patches minus token 0
    assert (so400m.input_size, so400m.sides, so400m.splits) == (768, (768, 384), (2, 1))
    assert (so400m.tower_runs, so400m.grid, so400m.output_tokens) == (5, (26, 28), 728)
    base256 = S2Geometry.for_tower(256, 255, RECIPE_3)  # siglip-base-patch16-256: 256 patches minus token 0
    assert (base256.input_size, base256.sides, base256.splits) == (768, (768, 512, 256), (3, 2, 1))
    assert (base256.tower_runs, base256.grid, base256.output_tokens) == (14, (15, 17), 255)
    plain = S2Geometry.for_tower(384, 10)  # scales: null -- any token count, no layout needed
    assert (plain.input_size, plain.tower_runs, plain.grid, plain.is_s2) == (384, 1, (1, 10), False)


def test_scale_lists_s2wrapper_cannot_run_exactly_are_refused():
    with pytest.raises(S2GeometryError, match=r"^scale 0\.75 resizes the 768-px input to 576 px, which is not a "
                       r"whole number of 384-px tower tiles \(s2wrapper would cut 2 x 2 tiles of 288 px\); "
                       r"use scales that give multiples of 384 px$"):
        S2Geometry.for_tower(384, 728, (1.0, 0.75))
    with pytest.raises(S2GeometryError, match=r"^scale 0\.1 resizes the 768-px input to 76 px"):
        S2Geometry.for_tower(384, 728, (1.0, 0.1))
    with pytest.raises(S2GeometryError, match=r"^the tower gives 10 tokens per tile; LLaVA-JP's s2wrapper lays "
                       r"them out as isqrt\(10\) = 3 rows, which does not divide 10$"):
        S2Geometry.for_tower(56, 10, (1.0, 0.5))
    with pytest.raises(S2GeometryError, match=r"^scales \[\]: need at least one scale, all positive$"):
        S2Geometry.for_tower(56, 15, ())


@pytest.mark.parametrize("scales", [(1.0, 0.5), RECIPE_3, (2.0, 1.0), (1.0,)], ids=["s2", "recipe3", "up2", "none"])
def test_s2_equals_the_seed_loop_reference(scales):
    tile, (gh, gw) = 32, (3, 5)
    geom = S2Geometry.for_tower(tile, gh * gw, scales)
    tower = fake_tower(tile, gh, gw)
    torch.manual_seed(1)
    img = torch.randn(2, 3, geom.input_size, geom.input_size)  # 2 images of different content
    got = s2_features(tower, img, geom)
    ref = seed_reference(tower, img, scales, tile)
    assert got.shape == ref.shape == (2, gh * gw, 5 * len(scales))
    assert (got - ref).abs().max().item() <= 1e-5
    assert not torch.allclose(got[0], got[1])


def test_s2_on_the_728_token_grid_and_the_older_call():
    gh, gw = 26, 28
    tower = fake_tower(32, gh, gw)
    img = torch.randn(2, 3, 64, 64)
    ref = seed_reference(tower, img, (1.0, 0.5), 32)
    got = s2_features(tower, img, S2Geometry.for_tower(32, 728, (1.0, 0.5)))
    assert got.shape == (2, 728, 10) and (got - ref).abs().max().item() <= 1e-5
    assert torch.equal(s2_features(tower, img, (1.0, 0.5), 32, (gh, gw)), got)  # scales, tile, grid


def test_images_of_another_size_are_refused():
    geom = S2Geometry.for_tower(32, 15, RECIPE_3)
    with pytest.raises(ValueError, match=r"^S2 expects 96 x 96 images \(tile 32 x 3 scales\), got 64 x 64$"):
        s2_features(fake_tower(32, 3, 5), torch.zeros(1, 3, 64, 64), geom)
