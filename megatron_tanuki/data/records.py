"""Training records on disk: an index of where each record is, and the bad-record ledger.

Formats: JSONL (one JSON object per line: plain text ``{"text"}`` for pretraining, chat
``{"messages": [{"role", "content"}]}``) and LLaVA JSON (one array of ``{"image", "conversations"}``;
``.jsonl`` of the same objects works too). JSONL files are indexed by byte offset and read one line
at a time; a JSON array is parsed once. A record is addressed by its position in the index, and
named ``file:line`` (JSONL) or ``file[i]`` (JSON array) in every message.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections import Counter


class DataError(ValueError):
    """Unusable data configuration (missing file, unreadable JSON array)."""


class TooManyBadRecords(RuntimeError):
    pass


class RecordIndex:
    def __init__(self, paths: list[str]):
        self.paths = [os.path.abspath(p) for p in paths]
        self.entries: list[tuple[int, int, int]] = []  # (file, byte offset or array index, line no)
        self.arrays: dict[int, list] = {}
        for fi, path in enumerate(self.paths):
            if not os.path.isfile(path):
                raise DataError(f"data file not found: {path}")
            if path.endswith(".json"):
                try:
                    with open(path, encoding="utf-8") as f:
                        items = json.load(f)
                except ValueError as e:
                    raise DataError(f"{path}: not a JSON array of records: {e}") from None
                if not isinstance(items, list):
                    raise DataError(f"{path}: expected a JSON array of records, got {type(items).__name__}")
                self.arrays[fi] = items
                self.entries += [(fi, i, i) for i in range(len(items))]
            else:
                with open(path, "rb") as f:
                    offset, line_no = 0, 0
                    for line in f:
                        line_no += 1
                        if line.strip():
                            self.entries.append((fi, offset, line_no))
                        offset += len(line)
        if not self.entries:
            raise DataError(f"no records in {', '.join(self.paths)}")

    def __len__(self) -> int:
        return len(self.entries)

    def where(self, i: int) -> str:
        fi, _, line_no = self.entries[i]
        path = self.paths[fi]
        return f"{path}[{line_no}]" if fi in self.arrays else f"{path}:{line_no}"

    def read(self, i: int):
        """The record (a dict), or raises ValueError with the reason (bad JSON, not an object)."""
        fi, offset, _ = self.entries[i]
        if fi in self.arrays:
            rec = self.arrays[fi][offset]
        else:
            with open(self.paths[fi], "rb") as f:
                f.seek(offset)
                raw = f.readline()
            try:
                rec = json.loads(raw)
            except ValueError as e:
                raise ValueError(f"invalid JSON: {e}") from None
        if not isinstance(rec, dict):
            raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
        return rec


class BadRecords:
    """Counts skipped records by reason, logs each with its place, stops the run past ``limit``."""

    def __init__(self, limit: int, log=print):
        self.limit, self.log = limit, log
        self.reasons: Counter = Counter()
        self.first: dict[str, str] = {}

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def skip(self, where: str, kind: str, detail: str) -> None:
        self.first.setdefault(kind, where)  # before the count: summary() reads first[kind] for every counted kind
        self.reasons[kind] += 1
        self.log(f"[data] skipped {where}: {detail}")
        self.check(self.total)

    def check(self, total: int) -> None:
        """``total``: the count to judge (this rank's, or summed over ranks)."""
        if total > self.limit:
            raise TooManyBadRecords(f"{total} bad records, more than data.max_bad_records={self.limit}: "
                                    + self.summary())

    def summary(self) -> str:
        if not self.reasons:
            return "no bad records"
        return "; ".join(f"{kind}: {n} (first at {self.first[kind]})" for kind, n in self.reasons.most_common())


class LineWriter:
    """Appends whole JSON lines, each flushed and fsynced under an exclusive lock: several writers may
    share one file (request groups of `tanuki generate`), and a kill leaves at most one torn last line."""

    def __init__(self, path: str):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        fcntl.flock(self.f, fcntl.LOCK_EX)
        try:
            self.f.write(line)
            self.f.flush()
            os.fsync(self.f.fileno())
        finally:
            fcntl.flock(self.f, fcntl.LOCK_UN)

    def close(self) -> None:
        self.f.close()
