"""What the training loop eats: one item per step (this rank's micro-batches + bookkeeping), built
ahead of the step by ``data.prefetch.Prefetcher``, and the held-out batches of an evaluation.

Two sources:
- ``RowFeed``: JSONL (text / chat / llava) through ``data.stream.RowStream``: every rank builds the
  same global batch of rows from text, keeps its contiguous DP share, decodes only its own images.
- ``IndexedFeed``: a megatron-core ``GPTDataset`` / ``BlendedDataset`` (data/blend.py). Step ``k`` uses
  samples ``[k * gbs, (k + 1) * gbs)``; DP rank ``r`` reads, for micro-batch ``m``, the samples
  ``start + m * mbs * dp + r * mbs + [0, mbs)`` -- Megatron-LM's MegatronPretrainingSampler -- so each
  rank sees the samples Megatron-LM would give it. The position is the count of consumed samples.

Each item carries the data position after it; the loop saves the position of the last item it
consumed, so prefetched-but-unused batches are produced again after a restart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_tanuki.train.step import Batch


@dataclass
class StepData:
    micro: list[Batch]
    real_tokens: int  # tokens with loss on this rank (padding excluded)
    flops: float  # model FLOPs of the whole global batch
    image_bad: int  # images this rank could not decode so far (cumulative)
    bad_reasons: dict  # records skipped so far, by kind (cumulative, the same on every rank; a copy made
    #                    by the producer: the checkpoint's record)
    position: dict  # the data position after this step


class RowFeed:
    def __init__(self, stream, gbs: int, mbs: int, dp: int, dp_rank: int, seq: int, pad_id: int,
                 image_size: int | None, image_bad, packed: bool, flops_per_row):
        self.stream, self.gbs, self.mbs, self.dp, self.dp_rank = stream, gbs, mbs, dp, dp_rank
        self.seq, self.pad_id, self.image_size, self.image_bad = seq, pad_id, image_size, image_bad
        self.packed, self.flops_per_row = packed, flops_per_row

    def position(self) -> dict:
        return self.stream.state_dict()

    def restore(self, state: dict) -> None:
        if state.get("format") == "indexed":
            raise ValueError("the checkpoint's run read indexed data (data.format indexed); this config reads JSONL")
        self.stream.load_state_dict(state)

    def _micro(self, rows) -> list[Batch]:
        from megatron_tanuki.train.batches import collate

        return [collate(rows[i:i + self.mbs], self.seq, self.pad_id, self.image_size, self.image_bad,
                        packed=self.packed) for i in range(0, len(rows), self.mbs)]

    def steps(self) -> Iterator[StepData]:
        per_rank = self.gbs // self.dp
        while True:
            rows = self.stream.next_rows(self.gbs)
            mine = rows[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
            real = sum(len(r) for r in mine)  # before padding
            flops = sum(self.flops_per_row(len(r.images)) for r in rows)
            micro = self._micro(mine)
            yield StepData(micro, real, flops, self.image_bad.total, dict(self.stream.bad.reasons), self.position())


def megatron_sampler_indices(start: int, gbs: int, mbs: int, dp: int, dp_rank: int) -> list[list[int]]:
    """This rank's sample indices, per micro-batch, of the global batch starting at ``start``."""
    per_step = mbs * dp
    return [[start + m * per_step + dp_rank * mbs + j for j in range(mbs)] for m in range(gbs // per_step)]


def indexed_batch(dataset, indices: list[int]) -> Batch:
    samples = [dataset[i] for i in indices]
    stack = (lambda k: torch.stack([s[k] for s in samples]))
    return Batch(tokens=stack("tokens"), labels=stack("labels"), loss_mask=stack("loss_mask").float(),
                 position_ids=stack("position_ids"))


class IndexedFeed:
    def __init__(self, dataset, gbs: int, mbs: int, dp: int, dp_rank: int, flops_per_row):
        self.dataset, self.gbs, self.mbs, self.dp, self.dp_rank = dataset, gbs, mbs, dp, dp_rank
        self.flops_per_row, self.consumed = flops_per_row, 0

    def position(self) -> dict:
        return {"format": "indexed", "consumed_samples": self.consumed}

    def restore(self, state: dict) -> None:
        if state.get("format") != "indexed":
            raise ValueError("the checkpoint's run read JSONL data; this config reads indexed data (data.format indexed)")
        self.consumed = int(state["consumed_samples"])

    def steps(self) -> Iterator[StepData]:
        while True:
            micro = [indexed_batch(self.dataset, ix)
                     for ix in megatron_sampler_indices(self.consumed, self.gbs, self.mbs, self.dp, self.dp_rank)]
            self.consumed += self.gbs
            real = int(sum(b.loss_mask.sum().item() for b in micro))
            yield StepData(micro, real, self.gbs * self.flops_per_row(0), 0, {}, self.position())


def indexed_eval_batches(dataset, iters: int, gbs: int, mbs: int, dp: int, dp_rank: int) -> Iterator[list[Batch]]:
    """The first ``iters`` global batches of a held-out dataset (the same ones at every evaluation)."""
    for k in range(iters):
        yield [indexed_batch(dataset, ix) for ix in megatron_sampler_indices(k * gbs, gbs, mbs, dp, dp_rank)]
