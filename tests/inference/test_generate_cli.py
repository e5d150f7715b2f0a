"""`tanuki generate` end to end, as a user runs it: a subprocess on a tiny dense checkpoint (fp32,
converted by `tanuki convert hf-to-mcore`) with the shipped tokenizer.

What a batch job must survive: bad lines (each answered by an error record naming its line and id,
the rest of the file served), a SIGKILL mid-run (the rerun appends only what is missing, the
greedy answers equal an uninterrupted run's), a torn last line, scoring, and two data-parallel
ranks (every id once, the same greedy texts as one rank).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
SMALL = ["--kv-memory-gb", "0.05"]
N = 40


# not under a launcher (RANK would make `tanuki generate` one rank of it); one thread, as spawned ranks use
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", "SLURM_STEP_ID", "TANUKI_DEBUG")},
       "OMP_NUM_THREADS": "1"}


def tanuki(cwd, *args, timeout=300):
    return subprocess.run([TANUKI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def generate(cwd, inp, out, *args, **kw):
    return tanuki(cwd, "generate", "--ckpt", "ck", "--input", inp, "--output", out, *SMALL, *args, **kw)


def records(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def by_id(recs) -> dict:
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), f"an id written twice: {sorted(ids, key=str)}"
    return {r["id"]: r for r in recs}


def write_lines(path, lines) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                     for line in lines)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with ``ck`` (the tiny dense model), the HF model itself, and the 40-request workload
    (mixed output lengths; every 5th request sampled, the rest greedy)."""
    from tests.convert import tiny_hf

    d = tmp_path_factory.mktemp("generate_cli")
    model = tiny_hf.dense_model(0)
    tiny_hf.save(model, str(d / "hf"), dtype=torch.float32)
    r = tanuki(d, "convert", "hf-to-mcore", "--hf", "hf", "--out", "ck")
    assert r.returncode == 0, r.stderr
    lines = []
    for i in range(N):
        rec = {"id": f"r{i}", "prompt": f"質問{i}: " + "猫と犬" * (i % 5), "max_tokens": 1 + i}
        rec.update({"temperature": 0.8, "top_p": 0.9} if i % 5 == 4 else {"temperature": 0})
        lines.append(rec)
    write_lines(d / "work.jsonl", lines)
    return {"dir": d, "model": model}


@pytest.fixture(scope="module")
def clean_run(work):
    """The workload in one uninterrupted 1-rank run: the reference for resume and data parallel."""
    d = work["dir"]
    r = generate(d, "work.jsonl", "clean.jsonl")
    assert r.returncode == 0, r.stderr
    recs = by_id(records(d / "clean.jsonl"))
    assert sorted(recs) == sorted(f"r{i}" for i in range(N))
    for i in range(N):
        rec = recs[f"r{i}"]
        assert rec["finish_reason"] in ("stop", "length") and "error" not in rec, rec
        assert rec["completion_tokens"] == 1 + i or rec["finish_reason"] == "stop", rec
    return recs


def greedy_ids():
    return [f"r{i}" for i in range(N) if i % 5 != 4]


def same_answer(a: dict, b: dict) -> bool:
    keys = ("text", "finish_reason", "prompt_tokens", "completion_tokens")
    return all(a[k] == b[k] for k in keys)


def test_bad_lines_are_error_records_and_the_rest_completes(work):
    from megatron_tanuki.data import templates
    from megatron_tanuki.data.tokenizer import load_tokenizer

    d = work["dir"]
    long_prompt = "猫" * 100
    write_lines(d / "bad.jsonl", [
        {"id": "a", "prompt": "こんにちは"},                                        # 1
        '{"id": "b", "prompt": "猫について"',                                       # 2 invalid JSON
        {"prompt": "no id here"},                                                   # 3
        {"id": "long", "prompt": long_prompt},                                      # 4 longer than --max-seq-len
        {"id": "hot", "prompt": "x", "temperature": "hot"},                         # 5
        {"id": "a", "prompt": "again"},                                             # 6 the id again
        "",                                                                         # 7 blank: skipped
        {"id": 7, "messages": [{"role": "user", "content": "犬"}], "max_tokens": 3},  # 8
        {"id": "c", "prompt": "x", "max_tokens": 0},                                # 9
        {"id": "d", "prompt": "日本の首都は", "stop": "の"},                           # 10
    ])
    with open(d / "bad.jsonl", "ab") as f:
        f.write(b'{"id": "z\xff", "prompt": "x"}\n')                                # 11 not UTF-8
    long_tokens = len(templates.prompt_ids(load_tokenizer(), "tanuki", [("user", long_prompt)]))
    assert long_tokens > 96
    r = generate(d, "bad.jsonl", "bad_out.jsonl", "--max-tokens", 8, "--temperature", 0, "--max-seq-len", 96)
    assert r.returncode == 0, r.stderr
    recs = records(d / "bad_out.jsonl")
    errors = {rec["line"]: rec for rec in recs if rec["finish_reason"] == "error"}
    assert {n: (e["id"], e["error"]) for n, e in errors.items()} == {
        2: (None, "bad.jsonl:2: invalid JSON (Expecting ',' delimiter at column 30)"),
        3: (None, 'bad.jsonl:3: no "id" (a string or an integer)'),
        4: ("long", f"bad.jsonl:4 (id 'long'): the prompt has {long_tokens} tokens; the context holds 96 "
                    "(prompt + completion, --max-seq-len)"),
        5: ("hot", "bad.jsonl:5 (id 'hot'): \"temperature\" must be float, got 'hot'"),
        6: ("a", "bad.jsonl:6: id 'a' again (first on line 1)"),
        9: ("c", "bad.jsonl:9 (id 'c'): \"max_tokens\" must be at least 1"),
        11: (None, "bad.jsonl:11: not UTF-8 text (byte 10 of the line)"),
    }
    good = by_id([rec for rec in recs if rec["finish_reason"] != "error"])
    assert sorted(good, key=str) == [7, "a", "d"]
    assert all("error" not in g and "line" not in g and g["prompt_tokens"] > 0 for g in good.values())
    assert good["a"]["finish_reason"] in ("stop", "length") and good[7]["completion_tokens"] <= 3
    assert "の" not in good["d"]["text"]
    assert r.stdout.strip().splitlines()[-1].startswith("tanuki generate: 10 request(s) (7 error record(s))")

    # Killed after the error records were written, before any answer: the rerun answers line 1's
    # "a" (line 6's error for the same id does not mark it done) and repeats no error.
    kept = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors.values())
    (d / "bad_out.jsonl").write_text(kept, encoding="utf-8")
    r = generate(d, "bad.jsonl", "bad_out.jsonl", "--max-tokens", 8, "--temperature", 0, "--max-seq-len", 96)
    assert r.returncode == 0, r.stderr
    text = (d / "bad_out.jsonl").read_text(encoding="utf-8")
    assert text.startswith(kept)
    again = records(d / "bad_out.jsonl")[len(errors):]
    assert {(rec["id"], rec["finish_reason"] != "error") for rec in again} == {("a", True), (7, True), ("d", True)}
    assert all(same_answer(rec, good[rec["id"]]) for rec in again)


@pytest.mark.parametrize("args, message", [
    (["--chat", "bogus"], "unknown conversation template 'bogus'; known: alpaca, llava-v1, nemotron4, none, plain, tanuki, v1"),
    (["--score", "yes,maybe not"], "--score 'maybe not': encodes to 2 tokens [24423, 849]; each scored answer "
                                   "must be one token (try it with or without a leading space)"),
])
def test_bad_options_are_one_line_user_errors(work, args, message, capsys, monkeypatch):
    """Found before a model is loaded; run through the CLI's own main (what the subprocess runs)."""
    from megatron_tanuki import cli

    d = work["dir"]
    monkeypatch.chdir(d)
    code = cli.main(["generate", "--ckpt", "ck", "--input", "work.jsonl", "--output", "never.jsonl", *args])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"tanuki generate: error: {message}"]
    assert not os.path.exists(d / "never.jsonl")


def test_score_gives_next_token_probabilities(work):
    """P(yes), P(no) at the end of each prompt, equal to transformers' softmax on the same ids."""
    from megatron_tanuki.data import templates
    from megatron_tanuki.data.tokenizer import load_tokenizer

    d = work["dir"]
    prompts = {"q1": "日本の首都は東京ですか？", "q2": "猫は犬ですか？", "q3": "1+1=2ですか？"}
    write_lines(d / "score.jsonl", [{"id": k, "prompt": v} for k, v in prompts.items()])
    r = generate(d, "score.jsonl", "score_out.jsonl", "--score", "yes,no")
    assert r.returncode == 0, r.stderr
    recs = by_id(records(d / "score_out.jsonl"))
    tok = load_tokenizer()
    yes, no = tok.encode("yes")[0], tok.encode("no")[0]
    for key, prompt in prompts.items():
        rec = recs[key]
        assert rec["text"] == "" and rec["completion_tokens"] == 0 and rec["finish_reason"] == "stop"
        assert set(rec["scores"]) == {"yes", "no"} and all(0 < p < 1 for p in rec["scores"].values())
        ids = templates.prompt_ids(tok, "tanuki", [("user", prompt)])
        assert rec["prompt_tokens"] == len(ids)
        with torch.no_grad():
            logits = work["model"](torch.tensor([ids])).logits[0, -1, :min(tok.vocab_size, 65024)]
        probs = torch.softmax(logits.double(), -1)
        assert rec["scores"]["yes"] == pytest.approx(probs[yes].item(), rel=1e-4)
        assert rec["scores"]["no"] == pytest.approx(probs[no].item(), rel=1e-4)


def test_sigkill_then_resume_appends_only_the_missing(work, clean_run):
    d = work["dir"]
    out = d / "killed.jsonl"
    cmd = [TANUKI, "generate", "--ckpt", "ck", "--input", "work.jsonl", "--output", "killed.jsonl", *SMALL]
    proc = subprocess.Popen(cmd, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 4:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    data = out.read_bytes()
    whole = data[:data.rfind(b"\n") + 1].splitlines(keepends=True)
    assert 4 <= len(whole) < N
    # A torn last line, as a kill in the middle of a write leaves it: half of the last record.
    torn = whole[-1][: len(whole[-1]) // 2]
    kept = b"".join(whole[:-1])
    out.write_bytes(kept + torn)
    first = [json.loads(line) for line in whole[:-1]]

    r = generate(d, "work.jsonl", "killed.jsonl")
    assert r.returncode == 0, r.stderr
    assert (f"[tanuki] killed.jsonl: dropped a torn last line ({len(torn)} bytes) left by a killed run"
            in r.stderr.splitlines())
    assert f"{len(first)} already in killed.jsonl" in r.stdout
    assert out.read_bytes().startswith(kept)  # appended, never rewritten
    recs = by_id(records(out))
    assert sorted(recs) == sorted(clean_run)
    assert json.loads(whole[-1])["id"] in recs  # the torn record's id was generated again
    for rid in greedy_ids():
        assert same_answer(recs[rid], clean_run[rid]), (recs[rid], clean_run[rid])


def test_two_ranks_data_parallel(work, clean_run):
    d = work["dir"]
    r = generate(d, "work.jsonl", "dp2.jsonl", "--nproc", 2)
    assert r.returncode == 0, r.stderr
    recs = by_id(records(d / "dp2.jsonl"))
    assert sorted(recs) == sorted(clean_run)
    for rid in greedy_ids():
        assert same_answer(recs[rid], clean_run[rid]), (recs[rid], clean_run[rid])
    assert (r.stdout + r.stderr).count("inference attention backend: paged-sdpa") == 1
    assert (r.stdout + r.stderr).splitlines().count("[tanuki] inference attention backend: paged-sdpa") == 1


def test_vision_image_errors(work, tmp_path):
    """Tanuki-vision: a missing and a corrupt image are error records; an image and a text request
    beside them are served."""
    from megatron_tanuki.data.images import sample_image
    from tests.convert import tiny_llava

    paths = tiny_llava.build(str(tmp_path), moe=False, dtype=torch.float32)
    r = tanuki(tmp_path, "convert", "hf-to-mcore", "--hf", paths["llava"], "--out", "ck")
    assert r.returncode == 0, r.stderr
    sample_image(64).save(tmp_path / "good.png")
    (tmp_path / "corrupt.png").write_bytes((tmp_path / "good.png").read_bytes()[:100])
    write_lines(tmp_path / "in.jsonl", [
        {"id": "ok", "prompt": "この画像を説明してください", "image": "good.png"},
        {"id": "missing", "prompt": "x", "image": "nope.png"},
        {"id": "corrupt", "prompt": "x", "image": "corrupt.png"},
        {"id": "text", "prompt": "こんにちは"},
    ])
    r = generate(tmp_path, "in.jsonl", "out.jsonl", "--max-tokens", 4, "--temperature", 0)
    assert r.returncode == 0, r.stderr
    recs = by_id(records(tmp_path / "out.jsonl"))
    assert {k: (v.get("line"), v.get("error")) for k, v in recs.items() if v["finish_reason"] == "error"} == {
        "missing": (2, f"in.jsonl:2 (id 'missing'): image file not found: {tmp_path}/nope.png"),
        "corrupt": (3, f"in.jsonl:3 (id 'corrupt'): cannot decode image {tmp_path}/corrupt.png: "
                       "image file is truncated"),
    }
    for key in ("ok", "text"):
        assert recs[key]["finish_reason"] in ("stop", "length") and recs[key]["prompt_tokens"] > 0
    # the image's placeholder became the tower's feature positions
    assert recs["ok"]["prompt_tokens"] > recs["text"]["prompt_tokens"] + 10


def test_read_done_cuts_lines_at_newlines_only(tmp_path):
    """Generated text may hold U+2028 (a line break to str.splitlines); blank lines are skipped;
    an error record stands for its line, an answer for its id."""
    from megatron_tanuki.inference.generate import read_done

    out = tmp_path / "out.jsonl"
    write_lines(out, [{"id": "x", "text": "a\u2028b\u0085c", "finish_reason": "length"}, "",
                      {"id": "x", "text": "", "finish_reason": "error", "error": "again", "line": 3},
                      {"id": 5, "text": "", "finish_reason": "stop"}])
    assert read_done(str(out)) == {'"x"', "@line 3", "5"}
