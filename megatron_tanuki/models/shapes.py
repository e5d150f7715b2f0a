"""The architecture numbers a conversion transform needs, as plain data.

It lives with the models because the HF name tables (``models/*/hf_map.py``) pair each rule with
its Shape; ``convert/transforms.py`` owns the functions that use it and re-exports the name.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    num_heads: int
    num_query_groups: int
    head_dim: int
    hf_vocab: int  # rows in the HF embedding / lm_head
    padded_vocab: int  # rows in megatron (a multiple of 128 for the Tanuki tokenizer)
