"""`tools/bench_synth.py`: the synth pipeline against its backend's ceiling and the seed team's schedule.

Three figures on one backend at one concurrency, on the same recipe and slots:
- ceiling: the backend saturated with independent requests (every slot's first-turn prompt, as many
  requests as the pipeline sends) -- what the teacher can give at that concurrency;
- pipeline: `tanuki synth run`'s continuous per-conversation schedule (runner.py);
- barrier: the seed team's schedule: batches of ``batch`` conversations, each turn (Q1, A1, Q2, A2)
  submitted for the whole batch and awaited before the next turn starts.
Tokens/s counts completion tokens. efficiency = pipeline / ceiling; speedup = pipeline / barrier.
Backends: the in-process engine on a small random model (CPU) or any OpenAI-compatible URL (our
server, vLLM, a fake one with realistic latency -- ``synth/fake_server.py``).
"""
from __future__ import annotations

import os
import tempfile
import time

from megatron_tanuki.synth.backend import run_requests
from megatron_tanuki.synth.conversation import DONE, REJECT, Conversation
from megatron_tanuki.synth.runner import RunOptions, run as run_pipeline
from megatron_tanuki.synth.store import Store


def ceiling(recipe, backend, requests: int) -> dict:
    """Completion tokens/s with the backend kept full of independent first-turn requests."""
    reqs = []
    for i in range(requests):
        req = Conversation(recipe, recipe.count + i).request()  # slots past the pipeline's: no cache reuse
        reqs.append(req)
    t0 = time.monotonic()
    tokens = sum(r.completion_tokens for r in run_requests(backend, reqs))
    return _figure(tokens, time.monotonic() - t0, requests)


def pipeline(recipe, backend, conversations: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as out:
        store = Store(out, recipe)
        try:
            s = run_pipeline(recipe, store, backend, RunOptions(limit=conversations, progress=False))
        finally:
            store.close()
    return _figure(s["completion_tokens"], s["seconds"], conversations * len(recipe.turns),
                   completed=s["completed"], rejected=s["rejected"])


def barrier(recipe, backend, conversations: int, batch: int) -> dict:
    """The seed team's stage-barrier schedule on the same backend (retries inside the stage)."""
    t0, tokens, done, rejected, sent = time.monotonic(), 0, 0, 0, 0
    for start in range(0, conversations, batch):
        convs = [Conversation(recipe, i) for i in range(start, min(conversations, start + batch))]
        for _ in recipe.turns:
            todo = list(convs)
            while todo:  # the stage ends when its last answer (retries included) is in
                by_key = {}
                for c in todo:
                    by_key[c.request().key] = c
                todo = []
                for res in run_requests(backend, [c.request() for c in by_key.values()]):
                    sent += 1
                    tokens += res.completion_tokens
                    c = by_key[res.key]
                    outcome = c.accept(res)
                    if outcome == DONE:
                        done += 1
                    elif outcome == REJECT:
                        rejected += 1
                        convs.remove(c)
                    elif c.attempt:  # a retry, asked again inside this stage
                        todo.append(c)
    return _figure(tokens, time.monotonic() - t0, sent, completed=done, rejected=rejected)


def compare(recipe, backend, conversations: int, batch: int, log=print) -> dict:
    log(f"[bench] ceiling: {conversations * len(recipe.turns)} independent requests")
    ceil = ceiling(recipe, backend, conversations * len(recipe.turns))
    log(f"[bench] pipeline: {conversations} conversations, continuous per-conversation scheduling")
    pipe = pipeline(recipe, backend, conversations)
    log(f"[bench] barrier: the same conversations in batches of {batch}, one turn at a time")
    bar = barrier(recipe, backend, conversations, batch)
    return {"conversations": conversations, "turns": len(recipe.turns), "barrier_batch": batch,
            "ceiling": ceil, "pipeline": pipe, "barrier": bar,
            "efficiency": round(pipe["tokens_per_s"] / max(ceil["tokens_per_s"], 1e-9), 4),
            "speedup_vs_barrier": round(pipe["tokens_per_s"] / max(bar["tokens_per_s"], 1e-9), 3)}


def _figure(tokens: int, seconds: float, requests: int, **extra) -> dict:
    return {"completion_tokens": tokens, "seconds": round(seconds, 3), "requests": requests,
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 2), **extra}


def format_result(r: dict) -> str:
    rows = [f"{'schedule':<10} {'tokens/s':>10} {'tokens':>8} {'seconds':>8}"]
    for k in ("ceiling", "pipeline", "barrier"):
        rows.append(f"{k:<10} {r[k]['tokens_per_s']:>10.1f} {r[k]['completion_tokens']:>8} {r[k]['seconds']:>8.2f}")
    rows.append(f"pipeline / ceiling = {100 * r['efficiency']:.1f}%   pipeline / barrier = {r['speedup_vs_barrier']:.2f}x")
    return "\n".join(rows)


def engine_backend_for_bench(shape: str = "cpu", batch: int = 16, max_len: int = 512, log=print):
    """An EngineBackend on a random model of an inference-bench shape (one process), the Tanuki tokenizer."""
    import torch

    from megatron_tanuki.data import templates
    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.inference import bench as gen_bench
    from megatron_tanuki.inference.engine import Engine, EngineOptions, kv_bytes_per_token
    from megatron_tanuki.synth.engine_backend import EngineBackend

    s = gen_bench.SHAPES[shape]
    cfg = s.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if s.threads and device == "cpu":
        torch.set_num_threads(s.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[s.dtype]
    hf = gen_bench.build_hf(cfg, dtype, device, 0)
    with tempfile.TemporaryDirectory(prefix="bench_synth_model_") as folder:
        chunks = gen_bench.megatron_model(cfg, s.dtype, hf, "memory", folder)
    del hf
    tok = load_tokenizer(None)
    blocks = batch * -(-max_len // 256) + 8
    gb = blocks * 256 * kv_bytes_per_token(chunks[0]) / 1024 ** 3
    engine = Engine(chunks, tok, EngineOptions(max_sequence_length=min(max_len, cfg.max_position_embeddings),
                                               kv_memory_gb=gb, max_requests=batch, max_tokens=8192),
                    vocab_limit=min(tok.vocab_size, cfg.vocab_size), log=log)
    return EngineBackend(engine, tok, templates.get("tanuki"), max_in_flight=batch)


def recipe_for_bench(max_tokens: int, count: int = 1000):
    """The seed team's persona recipe, Tanuki's template, answers of exactly ``max_tokens`` allowed (a
    random model rarely stops by itself; the fake server answers in fixed lengths)."""
    import yaml

    from megatron_tanuki.synth.recipe import parse_recipe

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "examples", "synth_persona_math_tanuki.yaml")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data["count"] = count
    data["sampling"]["max_tokens"] = max_tokens
    for t in data["turns"]:
        t.pop("require", None)
        t["allow_truncated"] = True
    return parse_recipe(data, path)
