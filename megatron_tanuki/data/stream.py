"""The resumable, seeded row stream every rank computes identically, and its DP split.

Order: records in a permutation of the index seeded by (seed, epoch). Rows of ``seq_length``:
- pretraining: ``<s> text </s>`` documents concatenated and cut (Megatron-LM style); the
  remainder of a cut document starts the next row.
- SFT / VLM with packing: samples appended greedily while they fit; each keeps its own position
  ids and a document id, from which the batch builds THD packed-sequence boundaries (cu_seqlens),
  so packed samples never attend to each other. Without packing: one sample per row.
Every rank builds the same global batch from text alone (images are only opened by the rank that
owns the row), so the data position -- ``state_dict()``: epoch, cursor, carried tokens -- does not
depend on the parallel layout and a run can resume under another DP size.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from megatron_tanuki.data.records import BadRecords, RecordIndex
from megatron_tanuki.data.samples import Sample, SampleBuilder, SampleError
from megatron_tanuki.data.templates import IGNORE_INDEX


@dataclass
class Row:
    inputs: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    docs: list[int] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    image_docs: list[int] = field(default_factory=list)  # the document each image belongs to
    where: list[str] = field(default_factory=list)

    def add(self, s: Sample) -> None:
        doc = len(self.where)
        self.inputs += s.inputs
        self.targets += s.targets
        self.positions += range(len(s))
        self.docs += [doc] * len(s)
        self.images += s.images
        self.image_docs += [doc] * len(s.images)
        self.where.append(s.where)

    def __len__(self) -> int:
        return len(self.inputs)


class RowStream:
    def __init__(self, index: RecordIndex, build: SampleBuilder, seq_length: int, seed: int,
                 pretrain: bool, pack: bool, bad: BadRecords):
        self.index, self.build, self.seq = index, build, seq_length
        self.seed, self.pretrain, self.pack, self.bad = seed, pretrain, pack, bad
        self.epoch, self.cursor, self.carry = 0, 0, []
        self._order_epoch, self._order = None, []
        self.known_bad: set[int] = set()  # reported once, then passed over quietly in later epochs

    # -- position -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "carry": list(self.carry), "records": len(self.index)}

    def load_state_dict(self, s: dict) -> None:
        if s["records"] != len(self.index):
            raise ValueError(f"the checkpoint's data had {s['records']} records, this run's has {len(self.index)}")
        self.epoch, self.cursor, self.carry = s["epoch"], s["cursor"], list(s["carry"])

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            self._order = list(range(len(self.index)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._order_epoch = epoch
        return self._order

    def _next_sample(self, advance: bool = True) -> Sample:
        """The next good sample from the cursor (bad ones are logged and passed over)."""
        while True:
            if self.cursor >= len(self.index):
                self.epoch, self.cursor = self.epoch + 1, 0
            i = self._order_for(self.epoch)[self.cursor]
            if i in self.known_bad:
                self.cursor += 1
                continue
            where = self.index.where(i)
            try:
                s = self.build(self.index.read(i), where)
            except (SampleError, ValueError) as e:
                self.cursor += 1
                self.known_bad.add(i)
                if isinstance(e, SampleError):
                    self.bad.skip(where, e.kind, str(e))
                else:
                    self.bad.skip(where, "unreadable record", f"{where}: {e}")
                continue
            if advance:
                self.cursor += 1
            return s

    # -- rows -----------------------------------------------------------------------------------
    def next_row(self) -> Row:
        row = Row()
        if self.pretrain:
            ids = list(self.carry)
            while len(ids) < self.seq + 1:
                s = self._next_sample()
                ids += s.inputs + s.targets[-1:]
            row.inputs, row.targets = ids[: self.seq], ids[1: self.seq + 1]
            row.positions, row.docs = list(range(self.seq)), [0] * self.seq
            self.carry = ids[self.seq + 1:]
            return row
        row.add(self._next_sample())
        while self.pack:
            s = self._next_sample(advance=False)
            if len(row) + len(s) > self.seq:
                break  # the sample opens the next row; the cursor stays on it
            self.cursor += 1
            row.add(s)
        return row

    def next_rows(self, n: int) -> list[Row]:
        return [self.next_row() for _ in range(n)]

    def rows_per_epoch(self) -> int:
        """Rows one pass over the data makes (a dry run over the texts; images are not opened)."""
        probe = RowStream(self.index, self.build, self.seq, self.seed, self.pretrain, self.pack,
                          BadRecords(limit=len(self.index), log=lambda *_: None))
        rows = 0
        while probe.epoch == 0:
            probe.next_row()
            rows += 1
        return rows


def pad_row(row: Row, seq_length: int, pad_id: int) -> Row:
    """Fill to ``seq_length``: pad tokens carry no loss and form one document of their own
    (nothing real attends to them: they come last)."""
    n = seq_length - len(row)
    if n > 0:
        pad_doc = (max(row.docs) + 1) if row.docs else 0
        row.inputs += [pad_id] * n
        row.targets += [IGNORE_INDEX] * n
        row.positions += list(range(n))
        row.docs += [pad_doc] * n
    return row
