"""`tanuki generate` under TP=2, PP=2 and EP=2 (2 gloo ranks) gives what one rank gives.

One tiny Tanuki MoE (tests/convert/tiny_hf.moe_model, fp32, 2 layers, 4 experts, top-2) converted
with `tanuki convert hf-to-mcore`; its output layer is scaled up so next-token distributions are
peaked rather than nearly uniform (top-p then really cuts, and greedy margins are wide). One input
file: four greedy prompts of different lengths and output lengths, and two sampled ones
(temperature 0.8, top-p 0.9; sampling is seeded per request, so a layout must not change a draw).
Every layout runs the real job (``generate.generate_rank``, the function behind the CLI's ranks) in
spawned ranks; the records must match one rank's: text, token counts, finish reason, and each
token's log-probability to 1e-4.

MoE with TP > 1 runs with sequence parallelism (``generate.load_model`` sets it), so TP=2 also
covers the SP path; PP=2 puts one decoder layer on each rank; EP=2 gives each rank two experts.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.convert import tiny_hf

TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
REQUESTS = [
    {"id": "short", "prompt": "猫", "max_tokens": 8},
    {"id": "question", "prompt": "日本の首都はどこですか？", "max_tokens": 12},
    {"id": "long", "prompt": "たぬきは日本の森に住む動物で、夜になると食べ物を探しに出かけます。" * 3,
     "max_tokens": 9},
    {"id": "english", "prompt": "Write a short poem about the sea.", "max_tokens": 11},
    {"id": "sampled-a", "prompt": "犬が走る", "max_tokens": 10, "temperature": 0.8, "top_p": 0.9},
    {"id": "sampled-b", "prompt": "Write a short poem about the sea.", "max_tokens": 10, "temperature": 0.8,
     "top_p": 0.9},
]
GREEDY = ["short", "question", "long", "english"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    base = tmp_path_factory.mktemp("engine_parallel")
    model = tiny_hf.moe_model(seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    hf = tiny_hf.save(model, str(base / "hf"), dtype=torch.float32)
    r = subprocess.run([TANUKI, "convert", "hf-to-mcore", "--hf", hf, "--out", str(base / "ck")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(base / "in.jsonl", "w", encoding="utf-8") as f:
        for req in REQUESTS:
            f.write(json.dumps(req, ensure_ascii=False) + "\n")
    return base


def generate(workdir, name: str, **layout) -> dict:
    """The job on ``tp*pp*ep`` spawned ranks; the output records by id."""
    from megatron_tanuki.inference.generate import GenerateJob, generate_rank
    from megatron_tanuki.runtime.spawn import run_ranks

    nproc = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("ep", 1)
    out = str(workdir / f"{name}.jsonl")
    job = GenerateJob(ckpt=str(workdir / "ck"), input=str(workdir / "in.jsonl"), output=out, nproc=nproc,
                      temperature=0.0, seed=7, chat="none", logprobs=True, kv_memory_gb=0.02,
                      max_seq_len=256, progress=False, **layout)
    counts = run_ranks(generate_rank, nproc, job)
    assert [c["requests"] for c in counts] == [len(REQUESTS)] * nproc
    assert counts[0]["errors"] == 0 and counts[0]["backend"] == "paged-sdpa"
    with open(out, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in REQUESTS)  # each id once
    return {r["id"]: r for r in records}


@pytest.fixture(scope="module")
def one_rank(workdir):
    ref = generate(workdir, "one_rank")
    # the comparison means something: different prompts, different continuations, full lengths
    assert len({ref[i]["prompt_tokens"] for i in GREEDY}) == 4
    assert len({ref[i]["text"] for i in ref}) == len(REQUESTS)
    assert [ref[r["id"]]["completion_tokens"] for r in REQUESTS] == [r["max_tokens"] for r in REQUESTS]
    # sampling happened: the same prompt greedy and sampled differ
    assert ref["sampled-b"]["text"] != ref["english"]["text"]
    return ref


def assert_same(records, ref):
    for rid, want in ref.items():
        got = records[rid]
        for field in ("text", "completion_tokens", "prompt_tokens", "finish_reason"):
            assert got[field] == want[field], (rid, field, got[field], want[field])
        diff = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"]))
        assert len(got["logprobs"]) == want["completion_tokens"] and diff <= 1e-4, (rid, diff)


def test_tensor_parallel_2_with_sequence_parallel_moe(workdir, one_rank):
    assert_same(generate(workdir, "tp2", tp=2), one_rank)


def test_pipeline_parallel_2(workdir, one_rank):
    assert_same(generate(workdir, "pp2", pp=2), one_rank)


def test_expert_parallel_2(workdir, one_rank):
    assert_same(generate(workdir, "ep2", ep=2), one_rank)


# ---- Tanuki-vision: images under TP=2 (+ sequence parallel, MoE) and in bf16 -------------------

@pytest.fixture(scope="module")
def vision_workdir(tmp_path_factory):
    from PIL import ImageOps

    from megatron_tanuki.data.images import sample_image
    from tests.convert import tiny_llava

    base = tmp_path_factory.mktemp("engine_parallel_vision")
    paths = tiny_llava.build(str(base), moe=True, dtype=torch.float32)
    r = subprocess.run([TANUKI, "convert", "hf-to-mcore", "--hf", paths["llava"], "--out", str(base / "ck")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    img = sample_image(112)
    img.save(base / "a.png")
    ImageOps.mirror(img).save(base / "b.png")
    reqs = [{"id": "a", "prompt": "何が見えますか？", "image": "a.png", "max_tokens": 8},
            {"id": "b", "prompt": "何が見えますか？", "image": "b.png", "max_tokens": 8},
            {"id": "text", "prompt": "こんにちは", "max_tokens": 6}]
    with open(base / "in.jsonl", "w", encoding="utf-8") as f:
        for req in reqs:
            f.write(json.dumps(req, ensure_ascii=False) + "\n")
    return base


def generate_vision(workdir, name: str, dtype=None, **layout) -> dict:
    from megatron_tanuki.inference.generate import GenerateJob, generate_rank
    from megatron_tanuki.runtime.spawn import run_ranks

    nproc = layout.get("tp", 1) * layout.get("pp", 1)
    out = str(workdir / f"{name}.jsonl")
    job = GenerateJob(ckpt=str(workdir / "ck"), input=str(workdir / "in.jsonl"), output=out, nproc=nproc,
                      temperature=0.0, kv_memory_gb=0.02, max_seq_len=256, progress=False, dtype=dtype, **layout)
    counts = run_ranks(generate_rank, nproc, job)
    assert counts[0]["errors"] == 0, open(out).read()
    with open(out, encoding="utf-8") as f:
        return {r["id"]: r for r in map(json.loads, f)}


def test_vision_moe_tensor_parallel_2_sequence_parallel(vision_workdir):
    """The engine builds the decoder input itself (image features written over the markers); under
    sequence parallelism it must hand the decoder its sequence shard, as TanukiVisionModel does."""
    ref = generate_vision(vision_workdir, "v1")
    assert ref["a"]["prompt_tokens"] == ref["b"]["prompt_tokens"] > ref["text"]["prompt_tokens"]
    got = generate_vision(vision_workdir, "vtp2", tp=2)
    for rid, want in ref.items():
        for field in ("text", "completion_tokens", "prompt_tokens", "finish_reason"):
            assert got[rid][field] == want[field], (rid, field)


def test_vision_in_bf16_serves_image_requests(vision_workdir):
    """A bf16 tower takes bf16 pixels (the images are decoded as float32)."""
    got = generate_vision(vision_workdir, "vbf16", dtype="bf16")
    assert [got[i]["finish_reason"] for i in ("a", "b", "text")] == ["length"] * 3
    assert got["a"]["completion_tokens"] == 8 and got["text"]["completion_tokens"] == 6
