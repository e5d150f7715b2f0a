"""Named transforms between HF tensors and megatron-core parameters (both directions).

``to_mcore(hf_tensors, shape) -> tensor`` and ``to_hf(tensor, shape) -> hf_tensors`` are exact
inverses: pure reshapes, concatenations and slices, no arithmetic, so round trips are bit-exact.
``shape`` carries the architecture numbers a transform needs (heads, groups, vocab sizes).
"""
from __future__ import annotations

import torch

from megatron_tanuki.models.shapes import Shape  # noqa: F401  (re-exported: transforms.Shape)


def _identity_to_mcore(ts, shape):
    (t,) = ts
    return t


def _identity_to_hf(t, shape):
    return [t]


def _qkv_to_mcore(ts, shape: Shape):
    """[q; k; v] -> per query group [q_g (heads/groups heads); k_g; v_g], megatron's fused layout."""
    q, k, v = ts
    g, d = shape.num_query_groups, shape.head_dim
    per = shape.num_heads // g
    rest = q.shape[1:]  # (hidden,) for weights, () for biases
    fused = torch.cat([q.view(g, per * d, *rest), k.view(g, d, *rest), v.view(g, d, *rest)], dim=1)
    return fused.reshape(g * (per + 2) * d, *rest)


def _qkv_to_hf(t, shape: Shape):
    g, d = shape.num_query_groups, shape.head_dim
    per = shape.num_heads // g
    rest = t.shape[1:]
    grouped = t.view(g, (per + 2) * d, *rest)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]


def _glu_to_mcore(ts, shape):
    gate, up = ts
    return torch.cat([gate, up], dim=0)


def _glu_to_hf(t, shape):
    gate, up = torch.chunk(t, 2, dim=0)
    return [gate.contiguous(), up.contiguous()]


def _vocab_to_mcore(ts, shape: Shape):
    (t,) = ts
    if t.shape[0] == shape.padded_vocab:
        return t
    pad = t.new_zeros(shape.padded_vocab - t.shape[0], *t.shape[1:])
    return torch.cat([t, pad], dim=0)


def _vocab_to_hf(t, shape: Shape):
    return [t[: shape.hf_vocab].contiguous()]


TRANSFORMS = {
    "identity": (_identity_to_mcore, _identity_to_hf),
    "qkv_interleave": (_qkv_to_mcore, _qkv_to_hf),
    "glu_concat": (_glu_to_mcore, _glu_to_hf),
    "vocab_rows": (_vocab_to_mcore, _vocab_to_hf),
}


def to_mcore(name: str, hf_tensors, shape: Shape) -> torch.Tensor:
    return TRANSFORMS[name][0](list(hf_tensors), shape)


def to_hf(name: str, tensor: torch.Tensor, shape: Shape) -> list[torch.Tensor]:
    return TRANSFORMS[name][1](tensor, shape)
