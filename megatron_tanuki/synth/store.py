"""The output folder of `tanuki synth run`: the recipe as run, data and reject shards, what is done.

    OUT/recipe.yaml                              the recipe (first line: its name and hash)
    OUT/data/shard-{i:05d}-of-{n:05d}.jsonl      completed conversations, appended whole lines + fsync
    OUT/rejects/shard-{i:05d}-of-{n:05d}.jsonl   conversations given up on, with the reason
    OUT/summary/shard-{i:05d}-of-{n:05d}.json    the last run's summary

A conversation is done when its line is in a data or reject file; a rerun skips it. A line torn by a
kill is cut off before anything is appended, so every file is whole lines of whole records.

One writer per shard: a run holds ``OUT/.lock-shard-i-of-n`` (flock) and a shared ``OUT/.lock-of-n``; a
second run of the same shard, or a run split another way (``0/2`` beside ``0/4``: the same ids) while
one is writing, is refused. Resume reads the files line by line (memory: the ids, never the text).
"""
from __future__ import annotations

import fcntl
import json
import os

from megatron_tanuki.data.records import LineWriter as Writer


def shard_name(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]:05d}-of-{shard[1]:05d}"


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: write it as i/n, e.g. 3/16") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: needs 0 <= i < n")
    return i, n


def in_shard(cid: str, shard: tuple[int, int]) -> bool:
    """Work is split by id (a hash), so shards stay balanced whatever the seed order."""
    return int(cid, 16) % shard[1] == shard[0]


class Store:
    def __init__(self, out: str, recipe, shard: tuple[int, int] = (0, 1), writes: bool = True, share=None):
        self.out, self.recipe, self.shard = out, recipe, shard
        name = shard_name(shard)
        self.data_path = os.path.join(out, "data", name + ".jsonl")
        self.rejects_path = os.path.join(out, "rejects", name + ".jsonl")
        self.summary_path = os.path.join(out, "summary", name + ".json")
        self.writes = writes
        self.share = share      # ranks that do not write get the writer's view of what is done
        self.data = self.rejects = None

    def open(self) -> set[str]:
        """Check the folder belongs to this recipe, write recipe.yaml, and return the done ids."""
        if self.share is not None and not self.writes:
            return self.share(None)
        self.claim()
        if self.writes:
            self._lock()
        done = set()
        for sub in ("data", "rejects"):
            folder = os.path.join(self.out, sub)
            if not os.path.isdir(folder):
                continue
            for f in sorted(os.listdir(folder)):
                if f.endswith(".jsonl"):
                    done |= read_ids(os.path.join(folder, f), repair=self.writes and f.startswith(
                        shard_name(self.shard)))
        if self.share is not None:
            done = self.share(done)
        if self.writes:
            self.data, self.rejects = Writer(self.data_path), Writer(self.rejects_path)
        return done

    def _lock(self) -> None:
        """Hold this shard's lock (exclusive) and the split's (shared); refuse what would write the same ids."""
        i, n = self.shard
        self._locks = []
        for name, mode, why in ((f".lock-of-{n}", fcntl.LOCK_SH, None),
                                (f".lock-{shard_name(self.shard)}", fcntl.LOCK_EX, f"another run is writing shard {i}/{n}")):
            f = open(os.path.join(self.out, name), "a")
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise RuntimeError(f"{self.out}: {why or 'a run split another way is writing'} (lock "
                                   f"{name}); wait for it or use another --out") from None
            self._locks.append(f)
        for other in os.listdir(self.out):  # a run split into another number of shards: the same ids
            if other.startswith(".lock-of-") and other != f".lock-of-{n}":
                with open(os.path.join(self.out, other), "a") as f:
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        fcntl.flock(f, fcntl.LOCK_UN)
                    except BlockingIOError:
                        raise RuntimeError(f"{self.out}: a run with --shard i/{other[len('.lock-of-'):]} is writing; "
                                           f"shards of another split ({n}) would write the same ids") from None

    def claim(self) -> None:
        path = os.path.join(self.out, "recipe.yaml")
        head = f"# recipe {self.recipe.name} hash {self.recipe.hash}\n"
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                first = f.readline()
                rest = f.read()
            if first != head:
                raise ValueError(f"{self.out}: holds the output of another recipe ({first.strip()[2:] or 'unknown'});"
                                 f" this is {self.recipe.name} hash {self.recipe.hash} -- use another --out")
            if rest == self.recipe.text or not self.writes:
                return
            # the same conversations, other text (count raised, a filters: section edited): merge and filter
            # read this file, so it follows the recipe
        if not self.writes:
            return
        os.makedirs(self.out, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(head + self.recipe.text)
        os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.data is not None:
            self.data.write(record)

    def reject(self, record: dict) -> None:
        if self.rejects is not None:
            self.rejects.write(record)

    def write_summary(self, summary: dict) -> None:
        if not self.writes:
            return
        os.makedirs(os.path.dirname(self.summary_path), exist_ok=True)
        tmp = f"{self.summary_path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False, indent=1)
        os.replace(tmp, self.summary_path)

    def close(self) -> None:
        for w in (self.data, self.rejects):
            if w is not None:
                w.close()
        self.data = self.rejects = None
        for f in getattr(self, "_locks", []):
            f.close()
        self._locks = []


def read_ids(path: str, repair: bool = False) -> set[str]:
    """Ids in a JSONL output, read line by line; a torn last line is cut off (``repair``) or ignored."""
    if repair:
        cut_torn_tail(path)
    ids = set()
    for n, raw in whole_lines(path):
        try:
            ids.add(json.loads(raw)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: not a synth record (JSON with an \"id\")") from None
    return ids


def cut_torn_tail(path: str) -> None:
    """Truncate ``path`` after its last newline (a kill mid-write leaves part of a line)."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            chunk = f.read(step)
            k = chunk.rfind(b"\n")
            if k >= 0:
                pos = pos - step + k + 1
                break
            pos -= step
        if pos != end:
            f.truncate(pos)


def whole_lines(path: str):
    """(line number, raw bytes) of every non-blank whole line; a torn last line (a kill mid-write) ends it."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return
            if raw.strip():
                yield n, raw


def iter_records(path: str):
    """(line number, record) of a JSONL output, a torn last line skipped."""
    for n, raw in whole_lines(path):
        try:
            yield n, json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line") from None
