"""`tanuki preprocess-data`: JSONL -> megatron-core indexed dataset, as a user runs it.

- every document reads back through megatron-core's own ``IndexedDataset`` as exactly the Tanuki
  tokenizer's ids + EOD (uint16: the vocabulary fits), one document per sequence;
- 2 workers write the same bytes as 1 (input order kept);
- a bad line is skipped, counted by kind and named file:line;
- a killed run leaves no ``.bin/.idx`` under the final name, and the next run cleans its leftovers.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", "SLURM_STEP_ID")},
       "OMP_NUM_THREADS": "1", "TANUKI_PROGRESS": "1"}


def tanuki(cwd, *args, timeout=300):
    return subprocess.run([TANUKI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)


def documents(n: int, start: int = 0) -> list[dict]:
    return [{"text": f"第{i}章。吾輩は猫である。名前はまだ無い。" * (1 + i % 4), "id": i} for i in range(start, start + n)]


def write(path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("preprocess")
    (d / "corpus").mkdir()
    write(d / "corpus" / "a.jsonl", documents(700) + ["{broken", '{"id": 1}'])
    write(d / "corpus" / "b.jsonl", documents(500, 700) + ['["a list"]', '{"text": ""}'])
    runs = {}
    r = tanuki(d, "preprocess-data", "--input", "corpus/*.jsonl", "--output-prefix", "out/w2", "--workers", 2)
    assert r.returncode == 0, r.stderr
    runs[2] = r
    from megatron_tanuki.data.indexed import preprocess

    runs[1] = preprocess([str(d / "corpus" / "*.jsonl")], str(d / "out" / "w1"), workers=1, progress=False,
                         log=lambda *_: None)
    return d, runs


def test_reads_back_through_megatron_core_as_the_tokenizer_ids(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_tanuki.data.tokenizer import load_tokenizer

    d, runs = corpus
    tok = load_tokenizer(None)
    ds = IndexedDataset(str(d / "out" / "w1_text_document"))
    docs = documents(1200)
    assert len(ds) == 1200 and list(ds.document_indices) == list(range(1201))
    assert ds[0].dtype.name == "uint16"
    for i in (0, 1, 2, 3, 699, 700, 1199):
        assert ds[i].tolist() == tok.encode(docs[i]["text"]) + [tok.eos_id]
    assert int(ds.sequence_lengths.sum()) == sum(len(tok.encode(x["text"])) + 1 for x in docs)
    assert runs[1]["documents"] == 1200 and runs[1]["tokens"] == int(ds.sequence_lengths.sum())
    assert (f"tanuki preprocess-data: 1200 document(s), {runs[1]['tokens']} tokens (uint16) from 2 file(s)"
            in runs[2].stdout)
    assert "(the path for data.blend: out/w2_text_document)" in runs[2].stdout


def test_two_workers_write_the_same_bytes(corpus):
    d, _ = corpus
    for ext in (".bin", ".idx"):
        assert (d / "out" / f"w1_text_document{ext}").read_bytes() == (d / "out" / f"w2_text_document{ext}").read_bytes()


def test_bad_lines_are_counted_and_named(corpus):
    d, runs = corpus
    r = runs[2]
    assert "bad lines: 1 empty, 1 no_text, 1 not_json, 1 not_object" in r.stdout
    assert "skipped corpus/a.jsonl:701: not a JSON line" in r.stderr
    assert "skipped corpus/a.jsonl:702: no string field 'text'" in r.stderr
    assert "skipped corpus/b.jsonl:501: not a JSON object" in r.stderr
    assert "skipped corpus/b.jsonl:502: empty 'text'" in r.stderr
    assert "docs/s" in r.stderr and "tokens/s" in r.stderr  # the progress bar (TANUKI_PROGRESS=1)


def test_existing_output_is_refused_unless_overwrite(corpus):
    from megatron_tanuki.data.indexed import preprocess

    d, _ = corpus
    prefix = str(d / "out" / "w1")
    with pytest.raises(ValueError, match=f"^{prefix}_text_document.bin: exists \\(give --overwrite to replace it\\)$"):
        preprocess([str(d / "corpus" / "a.jsonl")], prefix)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        preprocess([str(d / "nothing" / "*.jsonl")], prefix, overwrite=True)


def test_a_killed_run_leaves_no_final_output(tmp_path):
    write(tmp_path / "big.jsonl", documents(40000))
    p = subprocess.Popen([TANUKI, "preprocess-data", "--input", "big.jsonl", "--output-prefix", "out/big"],
                         cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not glob.glob(str(tmp_path / "out" / "big_text_document.tmp-*.bin")):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert not any(os.path.exists(tmp_path / "out" / f"big_text_document{e}") for e in (".bin", ".idx"))
    assert glob.glob(str(tmp_path / "out" / "big_text_document.tmp-*"))  # the killed run's partial file
    write(tmp_path / "big.jsonl", documents(50))
    r = tanuki(tmp_path, "preprocess-data", "--input", "big.jsonl", "--output-prefix", "out/big")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["big_text_document.bin", "big_text_document.idx"]
