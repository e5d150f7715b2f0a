"""Named transforms are exact inverses; vocab rows pad with zeros and slice back."""
import torch

from megatron_tanuki.convert import transforms
from megatron_tanuki.convert.transforms import Shape

SHAPE = Shape(num_heads=8, num_query_groups=2, head_dim=4, hf_vocab=65000, padded_vocab=65024)


def test_qkv_interleave_groups_queries_with_their_kv_head():
    h = 32
    q = torch.arange(8 * 4 * h, dtype=torch.float32).view(32, h)
    k = -torch.arange(2 * 4 * h, dtype=torch.float32).view(8, h) - 1
    v = k - 1000
    fused = transforms.to_mcore("qkv_interleave", [q, k, v], SHAPE)
    assert fused.shape == (48, h)
    # group 0: 4 query heads (16 rows), its k head (4 rows), its v head (4 rows); then group 1
    assert torch.equal(fused[:16], q[:16]) and torch.equal(fused[16:20], k[:4]) and torch.equal(fused[20:24], v[:4])
    assert torch.equal(fused[24:40], q[16:]) and torch.equal(fused[40:44], k[4:])
    back = transforms.to_hf("qkv_interleave", fused, SHAPE)
    assert all(torch.equal(a, b) for a, b in zip(back, [q, k, v]))


def test_glu_concat_round_trip():
    gate, up = torch.randn(6, 3), torch.randn(6, 3)
    fc1 = transforms.to_mcore("glu_concat", [gate, up], SHAPE)
    assert torch.equal(fc1, torch.cat([gate, up]))
    g2, u2 = transforms.to_hf("glu_concat", fc1, SHAPE)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_vocab_rows_pad_with_zeros_and_slice_back():
    emb = torch.randn(65000, 4).bfloat16()
    padded = transforms.to_mcore("vocab_rows", [emb], SHAPE)
    assert padded.shape == (65024, 4) and torch.equal(padded[:65000], emb)
    assert torch.count_nonzero(padded[65000:]) == 0
    (back,) = transforms.to_hf("vocab_rows", padded, SHAPE)
    assert torch.equal(back, emb)
