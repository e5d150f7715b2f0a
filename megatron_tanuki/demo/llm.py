"""`make demo`: a tiny Tanuki-8x8B-shaped MoE learns Japanese text on 2 CPU ranks (EP=2).

What it exercises is the real stack: the Tanuki tokenizer, the Tanuki router, megatron-core's
alltoall expert dispatch across two processes, its DDP, schedule and Adam optimizer. The text is
templated Japanese built from the seed team's persona and topic lists (shipped in the package),
so the held-out loss can fall within a few dozen steps on two cores.
(`tanuki demo --llm`; the main demo is now demo/vlm.py.)
"""
from __future__ import annotations

import json
import os
import random
import time

import torch

from megatron_tanuki.data.tokenizer import ASSETS, TanukiTokenizer

TEMPLATES = (
    "{p}は{t}について説明します。",
    "{p}の仕事では{t}の知識が役に立ちます。",
    "今日は{p}と一緒に{t}を勉強しました。",
    "{p}に{t}の質問をすると、丁寧に答えてくれます。",
)


def _read_jsonl(name: str, field: str) -> list[str]:
    with open(os.path.join(ASSETS, "topic-hub", name), encoding="utf-8") as f:
        return [json.loads(line)[field] for line in f if line.strip()]


def corpus(n: int, seed: int) -> list[str]:
    """``n`` Japanese sentences: persona x topic x template, seeded."""
    personas = _read_jsonl("persona_jp.jsonl", "persona")
    topics = [t for name in ("math_topic.jsonl", "reasoning_topic.jsonl")
              for t in _read_jsonl(name, "topic")]
    rng = random.Random(seed)
    return [rng.choice(TEMPLATES).format(p=rng.choice(personas), t=rng.choice(topics))
            for _ in range(n)]


def pack(tok: TanukiTokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate ``<s> text </s>`` documents and cut rows of seq_len + 1 tokens."""
    ids = [i for text in texts for i in tok.encode(text, bos=True, eos=True)]
    rows = len(ids) // (seq_len + 1)
    return torch.tensor(ids[: rows * (seq_len + 1)]).view(rows, seq_len + 1)


def run_rank(steps: int, seq_len: int, micro_batch: int, lr: float, seed: int, layout: dict) -> dict:
    """Rank-side training loop (started by runtime.spawn or torchrun)."""
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model
    from megatron_tanuki.models.tanuki.config import PRESETS
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed
    from megatron_tanuki.train.step import Batch, forward_backward, wrap_ddp

    cfg = PRESETS["tanuki-8x8b-tiny"]
    par = ParallelLayout(**layout)
    env = init_distributed(par, cfg, seed=seed)
    say = (lambda *a: print(*a, flush=True)) if env.rank == 0 else (lambda *a: None)

    tok = TanukiTokenizer()
    train = pack(tok, corpus(3000, seed), seq_len)
    held_out = pack(tok, corpus(200, seed + 1), seq_len)[: 2 * micro_batch]
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    say(f"[demo] {cfg.name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts "
        f"top-{cfg.moe_topk}, Tanuki router; layout {par.describe()} DP={dp} on {env.world_size} CPU ranks")
    say(f"[demo] data: {train.shape[0]} rows x {seq_len} tokens of templated Japanese "
        f"(real Tanuki tokenizer, {tok.vocab_size} pieces), e.g. 「{corpus(1, seed)[0]}」")

    chunks = wrap_ddp(build_model(cfg, par, BuildOptions(dtype="fp32")))
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.01, clip_grad=1.0,
                        adam_beta2=0.95, bf16=False, params_dtype=torch.float32), chunks,
        use_gloo_process_groups=False)

    def evaluate() -> float:
        for c in chunks:
            c.eval()
        with torch.no_grad():
            loss = forward_backward(chunks, [Batch.causal_lm(held_out)], seq_len, held_out.shape[0],
                                    forward_only=True)
        for c in chunks:
            c.train()
        return loss

    before = evaluate()
    say(f"[demo] held-out loss before training: {before:.3f}")
    g = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        order = torch.randperm(train.shape[0], generator=g)[: micro_batch * dp]  # same on all ranks
        mine = train[order[dp_rank * micro_batch:(dp_rank + 1) * micro_batch]]
        for c in chunks:
            c.zero_grad_buffer()
        opt.zero_grad()
        loss = forward_backward(chunks, [Batch.causal_lm(mine)], seq_len, micro_batch)
        _, grad_norm, _ = opt.step()
        losses.append(loss)
        if step == 1 or step % 10 == 0 or step == steps:
            tps = step * micro_batch * dp * seq_len / (time.perf_counter() - t0)
            say(f"[demo] step {step:4d}/{steps}  loss {loss:7.3f}  grad-norm {grad_norm:7.3f}  "
                f"{tps:7.0f} tokens/s")
    after = evaluate()
    say(f"[demo] held-out loss after {steps} steps: {after:.3f} (before {before:.3f})")
    return {"before": before, "after": after, "losses": losses}


def main(steps: int = 60, seq_len: int = 64, micro_batch: int = 8, lr: float = 3e-3,
         seed: int = 0, world_size: int = 2) -> dict:
    from megatron_tanuki.runtime.spawn import run_ranks

    layout = {"ep": world_size}
    results = run_ranks(run_rank, world_size, steps, seq_len, micro_batch, lr, seed, layout)
    r = results[0]
    verdict = "falls" if r["after"] < r["before"] else "DID NOT FALL"
    print(f"[demo] done: held-out loss {r['before']:.3f} -> {r['after']:.3f} ({verdict}); "
          f"train loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", flush=True)
    return r
