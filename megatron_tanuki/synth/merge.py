"""`tanuki synth merge`: join the shard outputs of one recipe and prove nothing is missing or doubled.

Shard runs (``--shard i/n``, Slurm array jobs) write ``data/shard-i-of-n.jsonl`` into one shared
folder or into folders of their own. Merging checks that every folder holds the same recipe (the
hash line of recipe.yaml), that no id appears twice (data and rejects together), and that every
slot ``0 .. count-1`` (or ``--limit``) is accounted for, in data or in rejects; then writes one data
file and one rejects file. Memory: one 16-character id per slot, never the text.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import yaml

from megatron_tanuki.synth.store import whole_lines


def _header(folder: str) -> tuple[str, str]:
    path = os.path.join(folder, "recipe.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no recipe.yaml: not a `tanuki synth run` output folder", path)
    with open(path, encoding="utf-8") as f:
        head = f.readline().strip()
    parts = head.split()
    if len(parts) != 5 or parts[:2] != ["#", "recipe"] or parts[3] != "hash":
        raise ValueError(f"{path}:1: expected '# recipe NAME hash HASH', got {head!r}")
    return parts[2], parts[4]


def _files(folder: str, sub: str) -> list[str]:
    d = os.path.join(folder, sub)
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".jsonl")] if os.path.isdir(d) else []


def merge(dirs: list[str], out: str, limit: int | None = None) -> dict:
    heads = {d: _header(d) for d in dirs}
    (name, digest), *others = heads.values()
    for d, h in heads.items():
        if h != (name, digest):
            raise ValueError(f"{d}: recipe {h[0]} hash {h[1]}, but {dirs[0]} holds {name} hash {digest}: "
                             "shards of different recipes cannot be merged")
    with open(os.path.join(dirs[0], "recipe.yaml"), encoding="utf-8") as f:
        recipe_text = f.read()
    count = int((yaml.safe_load(recipe_text) or {}).get("count", 1000))
    slots = min(count, limit) if limit else count
    expected = {hashlib.sha256(f"{digest}:{i}".encode()).hexdigest()[:16]: i for i in range(slots)}
    if os.path.exists(out):
        raise ValueError(f"--out {out}: exists; merge writes a new folder")
    tmp = f"{out.rstrip('/')}.tmp-{os.getpid()}"
    seen: dict[str, str] = {}
    counts = {"records": 0, "rejected": 0, "files": 0}
    try:
        for sub, key in (("data", "records"), ("rejects", "rejected")):
            os.makedirs(os.path.join(tmp, sub))
            with open(os.path.join(tmp, sub, "shard-00000-of-00001.jsonl"), "wb") as w:
                for folder in dict.fromkeys(os.path.abspath(d) for d in dirs):
                    for path in _files(folder, sub):
                        counts["files"] += 1
                        for n, rec, raw in _lines(path):
                            cid = rec.get("id")
                            if cid not in expected:
                                raise ValueError(f"{path}:{n}: id {cid!r} is not a slot of recipe {name} "
                                                 f"(hash {digest}, {slots} slots)")
                            if cid in seen:
                                raise ValueError(f"{path}:{n}: id {cid} already in {seen[cid]}")
                            seen[cid] = f"{path}:{n}"
                            w.write(raw)
                            counts[key] += 1
        missing = [i for cid, i in expected.items() if cid not in seen]
        if missing:
            raise ValueError(f"{len(missing)} of {slots} slot(s) are in no shard (e.g. slots "
                             f"{', '.join(map(str, missing[:5]))}): rerun the shards that lack them "
                             "(a rerun does only what is missing)")
        with open(os.path.join(tmp, "recipe.yaml"), "w", encoding="utf-8") as f:
            f.write(recipe_text)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**counts, "expected": slots}


def _lines(path: str):
    """(line number, record, raw bytes) of a shard file, one line at a time; a torn last line skipped."""
    for n, raw in whole_lines(path):
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{n}: not a synth record")
        yield n, rec, raw
