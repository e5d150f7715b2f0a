"""`tanuki synth run` end to end with a tiny real model, as a user runs it (subprocesses of the CLI).

Through the in-process engine: a 20-conversation recipe completes with the record schema; ids are the
recipe's and stable; a rerun does nothing; a fresh run reproduces every text (per-request seeds);
shards merged equal the unsharded run; a torn last line is repaired; another recipe's folder is
refused. Through `tanuki serve` (the openai backend against our own server): the same recipe
completes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from megatron_tanuki.synth.recipe import load_recipe

TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
SMALL = ["--kv-memory-gb", "0.05"]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", "SLURM_STEP_ID", "TANUKI_DEBUG")},
       "OMP_NUM_THREADS": "1"}
RECIPE = """name: tiny_persona
count: 20
teacher: {name: tiny-tanuki, chat: tanuki}
seeds:
  persona: {source: builtin:persona_jp, limit: 5}
  task: {source: builtin:basic_task, limit: 4}
combine: sampled
sampling: {temperature: 0.7, max_tokens: 6}
retries: 2
turns:
  - name: q1
    role: user
    prompt: [{role: user, content: "{persona}のための{task}の問題を作ってください。"}]
    allow_truncated: true
  - name: a1
    role: assistant
    prompt: [{role: user, content: "{q1}\\n\\n簡潔に日本語で回答してください。"}]
    allow_truncated: true
  - name: q2
    role: user
    prompt: [{role: user, content: "{q1}"}, {role: assistant, content: "{a1}"}, {role: user, content: "追加の質問を一つ。"}]
    allow_truncated: true
  - name: a2
    role: assistant
    prompt: [{role: user, content: "{q1}"}, {role: assistant, content: "{a1}"}, {role: user, content: "{q2}"}]
    allow_truncated: true
"""
KEYS = ["id", "index", "messages", "persona", "task", "teacher", "recipe", "sampling", "seed", "finish_reasons",
        "created"]


def tanuki(cwd, *args, timeout=300):
    return subprocess.run([TANUKI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def records(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def texts(recs) -> dict:
    return {r["id"]: r["messages"] for r in recs}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from tests.convert import tiny_hf

    d = tmp_path_factory.mktemp("synth_run")
    tiny_hf.save(tiny_hf.dense_model(0), str(d / "hf"), dtype=torch.float32)
    r = tanuki(d, "convert", "hf-to-mcore", "--hf", "hf", "--out", "ck")
    assert r.returncode == 0, r.stderr
    (d / "tiny.yaml").write_text(RECIPE, encoding="utf-8")
    r = tanuki(d, "synth", "run", "tiny.yaml", "--out", "out", "--ckpt", "ck", *SMALL)
    assert r.returncode == 0, r.stderr
    return d


def test_engine_run_completes_with_the_schema(work):
    recipe = load_recipe(str(work / "tiny.yaml"))
    recs = records(work / "out" / "data" / "shard-00000-of-00001.jsonl")
    assert sorted(r["index"] for r in recs) == list(range(20))
    assert {r["id"] for r in recs} == {recipe.conversation_id(i) for i in range(20)}
    for r in recs:
        assert list(r) == KEYS
        assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"]
        assert all(m["content"].strip() == m["content"] and m["content"] for m in r["messages"])
        assert r["finish_reasons"] == ["length"] * 4  # a random tiny model never stops by itself
        assert r["teacher"] == "tiny-tanuki" and r["recipe"] == {"name": "tiny_persona", "hash": recipe.hash}
        assert {r["persona"], r["task"]} <= set(recipe.seeds[0].values) | set(recipe.seeds[1].values)
        assert r == {**r, **recipe.variables(r["index"])}
    assert os.listdir(work / "out" / "rejects") == ["shard-00000-of-00001.jsonl"]
    assert (work / "out" / "rejects" / "shard-00000-of-00001.jsonl").read_text() == ""
    summary = json.loads((work / "out" / "summary" / "shard-00000-of-00001.json").read_text())
    assert summary["completed"] == 20 and summary["rejected"] == 0 and summary["abandoned"] == 0
    assert summary["completion_tokens"] == 20 * 4 * 6 and set(summary["tokens_per_s_by_turn"]) == {"q1", "a1", "q2", "a2"}
    assert (work / "out" / "recipe.yaml").read_text(encoding="utf-8") == \
        f"# recipe tiny_persona hash {recipe.hash}\n" + RECIPE


def test_rerun_skips_everything_done(work):
    path = work / "out" / "data" / "shard-00000-of-00001.jsonl"
    before = path.read_bytes()
    r = tanuki(work, "synth", "run", "tiny.yaml", "--out", "out", "--ckpt", "ck", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "0 conversation(s) written, 0 rejected, 20 already done" in r.stdout
    assert path.read_bytes() == before


def test_shards_merge_into_the_unsharded_run(work):
    """Two fresh shard runs reproduce the unsharded run's texts exactly (per-request seeds: a
    conversation's text does not depend on its batch, shard or run)."""
    for i in range(2):
        r = tanuki(work, "synth", "run", "tiny.yaml", "--out", "sharded", "--ckpt", "ck", "--shard", f"{i}/2", *SMALL)
        assert r.returncode == 0, r.stderr
    parts = [records(work / "sharded" / "data" / f"shard-0000{i}-of-00002.jsonl") for i in range(2)]
    assert all(parts) and all(int(r["id"], 16) % 2 == i for i, p in enumerate(parts) for r in p)
    r = tanuki(work, "synth", "merge", "sharded", "--out", "merged")
    assert r.returncode == 0, r.stderr
    assert "20 conversation(s) from 4 shard file(s)" in r.stdout
    merged = records(work / "merged" / "data" / "shard-00000-of-00001.jsonl")
    assert texts(merged) == texts(records(work / "out" / "data" / "shard-00000-of-00001.jsonl"))
    # a missing shard is named, and nothing is written
    import shutil

    shutil.copytree(work / "sharded", work / "half", ignore=shutil.ignore_patterns("shard-00001-of-00002*"))
    from megatron_tanuki.synth.merge import merge

    with pytest.raises(ValueError, match=f"^{len(parts[1])} of 20 slot\\(s\\) are in no shard"):
        merge([str(work / "half")], str(work / "merged2"))
    assert not (work / "merged2").exists() and not [p for p in os.listdir(work) if p.startswith("merged2")]


def test_two_pipeline_ranks_schedule_alike_and_match_one_rank(work):
    """PP=2 over 2 gloo ranks: both ranks run the scheduler, rank 0 writes; the texts equal the
    one-rank run's (pipeline stages change no arithmetic)."""
    r = tanuki(work, "synth", "run", "tiny.yaml", "--out", "pp2", "--ckpt", "ck", "--pp", "2", "--limit", "6", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "6 conversation(s) written" in r.stdout
    recs = records(work / "pp2" / "data" / "shard-00000-of-00001.jsonl")
    one = texts(records(work / "out" / "data" / "shard-00000-of-00001.jsonl"))
    assert sorted(x["index"] for x in recs) == list(range(6))
    assert texts(recs) == {k: one[k] for k in texts(recs)}


def test_sigusr1_reaches_local_ranks_and_exits_0(work):
    """`--pp 2` started here: SIGUSR1 (Slurm's warning before the time limit) to the launching process
    reaches both ranks, which agree to stop: --grace for the running conversations, the rest left for
    the rerun, exit 0; the rerun completes every slot exactly once."""
    import signal

    (work / "long.yaml").write_text(RECIPE.replace("name: tiny_persona", "name: long").replace("count: 20", "count: 16")
                                    .replace("max_tokens: 6", "max_tokens: 12"), encoding="utf-8")
    data = work / "sig" / "data" / "shard-00000-of-00001.jsonl"
    p = subprocess.Popen([TANUKI, "synth", "run", "long.yaml", "--out", "sig", "--ckpt", "ck", "--pp", "2",
                          "--grace", "1", *SMALL], cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 120
    while not data.exists():  # the model is loaded and the scheduler has opened its output
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.1)
    time.sleep(0.5)
    p.send_signal(signal.SIGUSR1)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    summary = json.loads((work / "sig" / "summary" / "shard-00000-of-00001.json").read_text())
    assert summary["stopped"] and summary["completed"] < 16
    assert summary["abandoned"] == 16 - summary["completed"]  # redone by the rerun, never lost or doubled
    r = tanuki(work, "synth", "run", "long.yaml", "--out", "sig", "--ckpt", "ck", *SMALL)
    assert r.returncode == 0, r.stderr
    assert sorted(x["index"] for x in records(data)) == list(range(16))


def test_torn_line_is_repaired_and_another_recipe_is_refused(work):
    r = tanuki(work, "synth", "run", "tiny.yaml", "--out", "torn", "--ckpt", "ck", "--limit", "5", *SMALL)
    assert r.returncode == 0, r.stderr
    path = work / "torn" / "data" / "shard-00000-of-00001.jsonl"
    lines = path.read_bytes().split(b"\n")[:-1]
    path.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:40])  # killed mid-line
    r = tanuki(work, "synth", "run", "tiny.yaml", "--out", "torn", "--ckpt", "ck", "--limit", "5", *SMALL)
    assert r.returncode == 0, r.stderr
    assert "2 conversation(s) written, 0 rejected, 3 already done" in r.stdout
    recs = records(path)
    assert sorted(r["index"] for r in recs) == list(range(5))
    (work / "other.yaml").write_text(RECIPE.replace("name: tiny_persona", "name: other"), encoding="utf-8")
    r = tanuki(work, "synth", "run", "other.yaml", "--out", "torn", "--ckpt", "ck", *SMALL)
    assert r.returncode == 2
    assert "torn: holds the output of another recipe (recipe tiny_persona hash" in r.stderr


def test_through_tanuki_serve(work):
    """The openai backend against our own server: the recipe completes with the same schema."""
    from megatron_tanuki.runtime.spawn import free_port

    port = free_port()
    server = subprocess.Popen([TANUKI, "serve", "--ckpt", "ck", "--port", str(port), *SMALL, "--max-seq-len", "256"],
                              cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            time.sleep(0.5)
        r = tanuki(work, "synth", "run", "tiny.yaml", "--out", "served", "--backend", "openai",
                   "--base-url", f"http://127.0.0.1:{port}/v1", "--concurrency", "8", timeout=180)
        assert r.returncode == 0, r.stderr
        recs = records(work / "served" / "data" / "shard-00000-of-00001.jsonl")
        assert sorted(x["index"] for x in recs) == list(range(20))
        assert all(list(x) == KEYS and len(x["messages"]) == 4 for x in recs)
    finally:
        server.terminate()
        server.wait(timeout=60)
