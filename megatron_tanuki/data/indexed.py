"""`tanuki preprocess-data`: JSONL documents -> megatron-core's indexed dataset (``.bin`` + ``.idx``).

The files are written by megatron-core's own ``IndexedDatasetBuilder``, so they are byte-for-byte the
format of ``megatron.core.datasets.indexed_dataset`` -- what Megatron-LM's ``tools/preprocess_data.py``
writes and what ``GPTDataset`` / ``BlendedMegatronDatasetBuilder`` read: a dataset made by either tool
with the same tokenizer serves the other. Names follow Megatron-LM: ``PREFIX_{key}_document.bin/.idx``
(``--output-prefix data/ja_web`` -> the blend path ``data/ja_web_text_document``).

How it behaves on a corpus of any size:
- streaming: files are read line by line, in chunks handed to the workers and written in input order
  (so 1 and N workers write the same bytes); memory holds one chunk of text and 12 bytes per
  document for the index (megatron's builder keeps Python lists; ours are packed arrays);
- each document is ``tokenizer.encode(text)`` (no BOS, as Megatron-LM's tokenizers) + EOD (the
  tokenizer's ``</s>``) unless ``--no-append-eod``; token ids as uint16 when the vocabulary fits (the
  Tanuki tokenizer: 65,024 ids), else int32 -- megatron's ``DType.optimal_dtype``;
- a bad line (not JSON, not an object, no string field, empty text) is skipped, counted by kind and
  named (file:line; the first 20 printed, all in the summary's counts);
- crash-safe: the files are built under ``NAME.tmp-PID.bin/.idx`` and renamed when complete (the
  index last, after any old index is gone), so a killed run leaves no ``.bin/.idx`` pair under the final
  name; leftovers of killed runs are removed by the next run.
"""
from __future__ import annotations

import array
import glob
import json
import os
import sys
import time

CHUNK_LINES = 4096          # lines per hand-off to the workers
NAMED_BAD = 20              # bad lines printed by name (all are counted)

_TOK = None                 # the tokenizer of a worker process


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


def expand_inputs(patterns: list[str]) -> list[str]:
    files = []
    for p in patterns:
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not hits:
            raise FileNotFoundError(2, "no file matches", p)
        for f in hits:
            if not os.path.isfile(f):
                raise FileNotFoundError(2, "input file not found", f)
        files += hits
    return list(dict.fromkeys(files))


def _init_worker(tokenizer: str | None) -> None:
    global _TOK
    from megatron_tanuki.data.tokenizer import load_tokenizer

    _TOK = load_tokenizer(tokenizer)


def _encode(job) -> list:
    """(kind, payload) per line of a chunk: ("ok", ids) or (bad kind, message)."""
    key, append_eod, lines = job
    out = []
    for where, raw in lines:
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            out.append(("not_json", f"{where}: not a JSON line ({e.msg})"))
            continue
        if not isinstance(rec, dict):
            out.append(("not_object", f"{where}: not a JSON object"))
            continue
        text = rec.get(key)
        if not isinstance(text, str):
            out.append(("no_text", f"{where}: no string field {key!r}"))
            continue
        ids = _TOK.encode(text)
        if not ids:
            out.append(("empty", f"{where}: empty {key!r}"))
            continue
        if append_eod:
            ids.append(_TOK.eos_id)
        out.append(("ok", ids))
    return out


def _chunks(files: list[str]):
    chunk = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                chunk.append((f"{path}:{n}", line))
                if len(chunk) == CHUNK_LINES:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def preprocess(inputs: list[str], prefix: str, *, json_key: str = "text", workers: int = 1,
               append_eod: bool = True, tokenizer: str | None = None, overwrite: bool = False,
               progress: bool | None = None, log=print) -> dict:
    """Tokenize every document of ``inputs`` (paths or globs) into ``PREFIX_{key}_document.bin/.idx``."""
    import numpy
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.runtime.progress import progress_disabled

    files = expand_inputs(inputs)
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be at least 1")
    final = output_prefix(prefix, json_key)
    folder = os.path.dirname(os.path.abspath(final))
    os.makedirs(folder, exist_ok=True)
    if not overwrite and any(os.path.exists(final + ext) for ext in (".bin", ".idx")):
        raise ValueError(f"{final}.bin: exists (give --overwrite to replace it)")
    for stale in glob.glob(glob.escape(final) + ".tmp-*"):  # a killed run's partial files
        os.remove(stale)
    tok = load_tokenizer(tokenizer)
    dtype = DType.optimal_dtype(tok.vocab_size)
    tmp = f"{final}.tmp-{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    builder.sequence_lengths = array.array("i")          # 4 + 8 bytes per document, not two list slots
    builder.document_indices = array.array("q", [0])
    counts = {"documents": 0, "tokens": 0, "bad": {}}
    named = 0
    bar = None
    if not progress_disabled(progress):
        from tqdm import tqdm

        bar = tqdm(unit=" docs", desc="[tanuki] preprocess-data", file=sys.stderr)
    t0 = time.perf_counter()
    pool = None
    try:
        jobs = ((json_key, append_eod, c) for c in _chunks(files))
        if workers == 1:
            _init_worker(tokenizer)
            results = map(_encode, jobs)
        else:
            import multiprocessing

            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tokenizer,))
            results = _in_order(jobs, pool, 2 * workers)
        for chunk in results:
            for kind, payload in chunk:
                if kind == "ok":
                    builder.add_document(numpy.asarray(payload, dtype=dtype), [len(payload)])
                    counts["documents"] += 1
                    counts["tokens"] += len(payload)
                    continue
                counts["bad"][kind] = counts["bad"].get(kind, 0) + 1
                if named < NAMED_BAD:
                    log(f"[tanuki] skipped {payload}", file=sys.stderr) if log is print else log(payload)
                    named += 1
            if bar is not None:
                bar.update(len(chunk))
                el = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{counts['documents'] / el:.0f} docs/s, {counts['tokens'] / el:.0f} tokens/s")
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        builder.finalize(tmp + ".idx")
        if os.path.exists(final + ".idx"):
            os.remove(final + ".idx")  # never an old index beside a new .bin
        os.replace(tmp + ".bin", final + ".bin")
        os.replace(tmp + ".idx", final + ".idx")
    except BaseException:
        if pool is not None:
            pool.terminate()
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    return {**counts, "prefix": final, "files": len(files), "dtype": numpy.dtype(dtype).name,
            "seconds": round(seconds, 3), "docs_per_s": round(counts["documents"] / max(seconds, 1e-9), 1),
            "tokens_per_s": round(counts["tokens"] / max(seconds, 1e-9), 1)}


def _in_order(jobs, pool, ahead: int):
    """Encoded chunks in input order, ``ahead`` chunks in the workers at a time (``imap`` would read the
    whole corpus ahead into memory)."""
    import itertools

    while batch := list(itertools.islice(jobs, ahead)):
        yield from pool.map(_encode, batch)
