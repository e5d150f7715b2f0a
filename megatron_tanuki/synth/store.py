"""The output folder of `tanuki synth run`: the recipe as run, data and reject shards, what is done.

    OUT/recipe.yaml                              the recipe (first line: its name and hash)
    OUT/data/shard-{i:05d}-of-{n:05d}.jsonl      completed conversations, appended whole lines + fsync
    OUT/rejects/shard-{i:05d}-of-{n:05d}.jsonl   conversations given up on, with the reason
    OUT/summary/shard-{i:05d}-of-{n:05d}.json    the last run's summary

A conversation is done when its line is in a data or reject file; a rerun skips it. A line torn by a
kill is cut off before anything is appended, so every file is whole lines of whole records.
"""
from __future__ import annotations

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

    def claim(self) -> None:
        path = os.path.join(self.out, "recipe.yaml")
        head = f"# recipe {self.recipe.name} hash {self.recipe.hash}\n"
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                first = f.readline()
            if first != head:
                raise ValueError(f"{self.out}: holds the output of another recipe ({first.strip()[2:] or 'unknown'});"
                                 f" this is {self.recipe.name} hash {self.recipe.hash} -- use another --out")
            return
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


def read_ids(path: str, repair: bool = False) -> set[str]:
    """Ids in a JSONL output; a torn last line is cut off (``repair``) or ignored."""
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        if repair:
            with open(path, "r+b") as f:
                f.truncate(keep)
        data = data[:keep]
    ids = set()
    for n, raw in enumerate(data.split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            ids.add(json.loads(raw)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{n}: not a synth record (JSON with an \"id\")") from None
    return ids


def iter_records(path: str):
    """(line number, record) of a JSONL output, a torn last line skipped."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                return
            if raw.strip():
                try:
                    yield n, json.loads(raw)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{n}: not a JSON line") from None
