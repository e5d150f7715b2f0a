"""Rows -> megatron micro-batches: tensors, packed-sequence boundaries, and this rank's images.

Packed rows become one THD sequence ``[1, rows * seq_length]`` with megatron-core's
``PackedSeqParams`` (``cu_seqlens`` at every sample boundary): Transformer Engine on the cluster and
our SDPA attention on CPU read the same boundaries, and megatron-core restarts RoPE per sample.
No ``[s, s]`` mask is ever built. The padding at a row's end is one segment of its own.

Images are decoded here, on the rank that owns the row. An image that fails to decode (corrupt,
truncated, too small) is counted as a bad record and its sample is blanked -- its tokens become
padding with no loss -- so every rank keeps the same batch shapes and schedule.
"""
from __future__ import annotations

import torch

from megatron_tanuki.data.images import ImageError, load_image, preprocess
from megatron_tanuki.data.records import BadRecords
from megatron_tanuki.data.stream import Row, pad_row
from megatron_tanuki.data.templates import IGNORE_INDEX
from megatron_tanuki.train.step import Batch


def _blank_sample(row: Row, doc: int, pad_id: int) -> None:
    for i, d in enumerate(row.docs):
        if d == doc:
            row.inputs[i], row.targets[i] = pad_id, IGNORE_INDEX


def _row_images(row: Row, image_size: int, pad_id: int, bad: BadRecords) -> list[torch.Tensor]:
    out = []
    for doc in sorted(set(row.image_docs)):
        paths = [p for p, d in zip(row.images, row.image_docs) if d == doc]
        try:
            pixels = [preprocess(load_image(p, row.where[doc]), image_size) for p in paths]
        except ImageError as e:
            bad.skip(row.where[doc], "corrupt image", str(e))
            _blank_sample(row, doc, pad_id)
            continue
        out += pixels
    return out


def collate(rows: list[Row], seq_length: int, pad_id: int, image_size: int | None, bad: BadRecords,
            packed: bool) -> Batch:
    tokens, labels, positions, docs, images = [], [], [], [], []
    for row in rows:
        row = pad_row(row, seq_length, pad_id)
        if image_size:
            images += _row_images(row, image_size, pad_id, bad)
        tokens.append(row.inputs)
        labels.append(row.targets)
        positions.append(row.positions)
        docs.append(row.docs)
    targets = torch.tensor(labels)
    batch = Batch(tokens=torch.tensor(tokens), labels=targets.clamp(min=0),
                  loss_mask=(targets != IGNORE_INDEX).float(), position_ids=torch.tensor(positions),
                  images=torch.stack(images) if images else None)
    return pack_thd(batch, docs) if packed else batch


def segment_bounds(docs: list[list[int]]) -> list[int]:
    """Cumulative sample boundaries over the rows laid end to end: a new segment wherever the
    document id changes, and at every row start."""
    bounds, offset = [0], 0
    for row in docs:
        for i in range(1, len(row)):
            if row[i] != row[i - 1]:
                bounds.append(offset + i)
        offset += len(row)
        bounds.append(offset)
    return bounds


def pack_thd(batch: Batch, docs: list[list[int]]) -> Batch:
    """``[b, s]`` rows -> one ``[1, b*s]`` THD sequence with ``PackedSeqParams``."""
    from megatron.core.packed_seq_params import PackedSeqParams

    bounds = segment_bounds(docs)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=longest, max_seqlen_kv=longest)
    flat = (lambda t: t.reshape(1, -1))
    return Batch(tokens=flat(batch.tokens), labels=flat(batch.labels), loss_mask=flat(batch.loss_mask),
                 position_ids=flat(batch.position_ids), images=batch.images, packed_seq_params=params)
