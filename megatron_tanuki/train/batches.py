"""Rows -> megatron micro-batches: tensors, the per-document mask, and this rank's images.

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
    doc = torch.tensor(docs)
    mask = None
    if packed:
        # True = masked out (megatron's convention); causality is added inside attention.
        mask = (doc.unsqueeze(2) != doc.unsqueeze(1)).unsqueeze(1)
    return Batch(tokens=torch.tensor(tokens), labels=targets.clamp(min=0),
                 loss_mask=(targets != IGNORE_INDEX).float(), position_ids=torch.tensor(positions),
                 attention_mask=mask, images=torch.stack(images) if images else None)
