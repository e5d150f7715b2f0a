"""Serving benchmark: `tanuki serve` under N concurrent streaming clients beside the same engine
offline on the same requests (what tools/bench_serve.py runs).

Why these parts:

* The server is the real thing: `tanuki serve` started as a subprocess on 127.0.0.1 (a free port),
  ready when ``GET /health`` answers, stopped with SIGTERM (it must exit 0). The clients are httpx
  streams in this process (lighter than the ``openai`` client, whose per-chunk parsing would count
  as server time on a small machine), ``concurrency`` of them, each taking the next request when
  its last one ends.
* Requests are ``prompt_len`` seeded random token ids sent as an OpenAI token-id ``prompt`` to
  ``/v1/completions`` (no chat template, no tokenizer round trip), greedy, ``max_tokens`` each.
  The engine has no ignore-EOS switch, so a request may end early at EOS: both sides count the
  tokens they actually produced, and greedy decoding makes those the same tokens (``same_as_offline``).
* Offline is the engine under `tanuki generate`, in this process after the server stopped: the
  checkpoint loaded by ``generate.load_model``, an :class:`Engine` with the server's options, the
  same prompts through ``Engine.run`` (what `tanuki generate` does), timed from the first
  submission to the last completion (model loading excluded on both sides). It runs twice: with at
  most ``concurrency`` requests in flight, as the clients keep the server -- the baseline of the
  overhead ratio, since a server that has only C requests cannot batch more than C -- and with every
  request submitted at once, as `tanuki generate` runs a file (reported beside it).
* Throughput = output tokens / (first request sent -> last response ended). TTFT: request sent ->
  first chunk with text. ITL: the gaps between a stream's text chunks (a chunk holds one engine
  step's tokens, or more when a UTF-8 character is held back). TPOT: a request's
  (last chunk - first chunk) / (tokens - 1).

CPU runs use one torch thread on both sides by default (``threads``): the clients need the other
core of a 2-core machine. It measures and prints; it asserts nothing about speed.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from megatron_tanuki.inference import bench as generate_bench


@dataclass
class BenchOptions:
    shape: str | None = None           # a shape of inference/bench.py (random weights), unless ckpt
    ckpt: str | None = None            # an existing checkpoint instead of random weights
    requests: int = 48
    concurrency: int = 16
    prompt_len: int = 64
    max_tokens: int = 64
    seed: int = 0
    threads: int | None = None         # torch CPU threads on both sides (default: the shape's; 1 on CPU)
    kv_memory_gb: float | None = None  # both sides (default: the engine's)
    max_seq_len: int | None = None     # both sides (default: the model's)
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 600.0
    log: object = field(default=print, repr=False)


def check(o: BenchOptions) -> None:
    for name in ("requests", "concurrency", "prompt_len", "max_tokens"):
        if getattr(o, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(o, name)}: must be at least 1")
    if o.ckpt is None and o.shape is not None and o.shape not in generate_bench.SHAPES:
        raise ValueError(f"--shape {o.shape!r}: expected one of {sorted(generate_bench.SHAPES)}")
    if o.ckpt is not None and o.shape is not None:
        raise ValueError("give --shape (random weights) or --ckpt (a checkpoint), not both")
    if o.ckpt is not None and not os.path.isdir(o.ckpt):
        raise FileNotFoundError(2, "checkpoint folder not found", o.ckpt)


def make_prompts(n: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    """Seeded random ids in 3..vocab-1 (past <unk>, <s>, </s>)."""
    rng = random.Random(f"{seed}/serve")
    return [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(n)]


def percentiles(xs: list[float]) -> dict:
    """p50 / p99 / mean in milliseconds (linear interpolation, numpy's default); None when empty."""
    import numpy as np

    if not xs:
        return {"p50": None, "p99": None, "mean": None, "n": 0}
    a = np.asarray(xs) * 1000.0
    return {"p50": round(float(np.percentile(a, 50)), 2), "p99": round(float(np.percentile(a, 99)), 2),
            "mean": round(float(a.mean()), 2), "n": len(xs)}


def _rate(tokens: int, seconds: float) -> float:
    return round(tokens / max(seconds, 1e-9), 1)


# ------------------------------------------------------------------------------ the checkpoint

def random_checkpoint(shape: str, folder: str, seed: int, log=print) -> str:
    """Random HF weights of ``shape`` (transformers' own init, as inference/bench.py builds them),
    converted by ``hf_to_mcore``; returns the checkpoint folder."""
    from megatron_tanuki.convert.engine import hf_to_mcore

    s = generate_bench.SHAPES[shape]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[s.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log(f"[bench] random {s.model.hidden_size}x{s.model.num_layers} weights ({s.dtype}) -> megatron-core checkpoint")
    hf = generate_bench.build_hf(s.model, dtype, device, seed)
    hf_dir, ckpt = os.path.join(folder, "hf"), os.path.join(folder, "ckpt")
    hf.save_pretrained(hf_dir)
    del hf
    hf_to_mcore(hf_dir, ckpt)
    return ckpt


# ------------------------------------------------------------------------------ the server

class Server:
    """`tanuki serve` in a subprocess; its output goes to ``log_path``."""

    def __init__(self, ckpt: str, o: BenchOptions, log_path: str):
        from megatron_tanuki.runtime.spawn import free_port

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "megatron_tanuki.cli", "serve", "--ckpt", ckpt, "--host", "127.0.0.1",
               "--port", str(self.port), "--max-concurrency", str(max(256, 2 * o.concurrency)),
               "--seed", str(o.seed)]
        if o.kv_memory_gb is not None:
            cmd += ["--kv-memory-gb", str(o.kv_memory_gb)]
        if o.max_seq_len is not None:
            cmd += ["--max-seq-len", str(o.max_seq_len)]
        # a server of its own, not a rank of a launcher this benchmark may run under
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID", "TANUKI_API_KEY")}
        if o.threads:
            env["OMP_NUM_THREADS"] = str(o.threads)
        self.cmd = cmd
        self._out = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env)

    def tail(self, n: int = 3000) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until ``GET /health`` answers 200; raises if the server exits or times out."""
        import httpx

        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tanuki serve exited with {self.proc.returncode} before answering /health; "
                                   f"its output ({self.log_path}):\n{self.tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2.0).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"tanuki serve did not answer {self.base}/health within {timeout_s:g} s; "
                                   f"its output ({self.log_path}):\n{self.tail()}")
            time.sleep(0.25)

    def model_id(self) -> str:
        import httpx

        r = httpx.get(self.base + "/v1/models", timeout=10.0)
        r.raise_for_status()
        return r.json()["data"][0]["id"]

    def stop(self, timeout_s: float = 120.0) -> int:
        """SIGTERM and wait; the exit code (SIGKILL after ``timeout_s`` gives a negative one)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


# ------------------------------------------------------------------------------ the clients

@dataclass
class Result:
    """One streamed request as the client saw it (times in perf_counter seconds)."""

    sent: float = 0.0
    chunks: list[float] = field(default_factory=list)   # arrival of each chunk carrying text
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    ended: float = 0.0


async def _stream_one(client, url: str, body: dict, res: Result) -> None:
    res.sent = time.perf_counter()
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            res.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                res.error = json.dumps(chunk["error"])[:300]
                continue
            for choice in chunk.get("choices") or ():
                text = choice.get("text") or ""
                if text:
                    res.chunks.append(time.perf_counter())
                    res.text += text
                if choice.get("finish_reason"):
                    res.finish_reason = choice["finish_reason"]
            usage = chunk.get("usage")
            if usage:
                res.prompt_tokens, res.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    res.ended = time.perf_counter()


async def _clients(base: str, model: str, prompts: list[list[int]], max_tokens: int, concurrency: int,
                   timeout_s: float) -> tuple[list[Result], float, float]:
    """``concurrency`` workers stream ``prompts`` in order; (results, start, end)."""
    import httpx

    url = base + "/v1/completions"
    results = [Result() for _ in prompts]
    todo = iter(range(len(prompts)))

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s),
                                 limits=httpx.Limits(max_connections=concurrency + 4,
                                                     max_keepalive_connections=concurrency + 4)) as client:
        async def worker():
            for i in todo:
                body = {"model": model, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}}
                try:
                    await _stream_one(client, url, body, results[i])
                except (httpx.HTTPError, json.JSONDecodeError) as e:
                    results[i].error = f"{type(e).__name__}: {e}"

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(prompts)))))
        t1 = time.perf_counter()
    return results, t0, t1


def server_side(server: Server, prompts, o: BenchOptions) -> tuple[dict, list[Result]]:
    """Warm-up (2 short requests), then the timed run; the figures and each request's result."""
    model = server.model_id()
    warm, _, _ = asyncio.run(_clients(server.base, model, prompts[:2], 4, 2, o.request_timeout_s))
    bad = [r.error for r in warm if r.error]
    if bad:
        raise RuntimeError(f"warm-up request failed: {bad[0]}")
    o.log(f"[bench] server: {len(prompts)} requests, {o.concurrency} concurrent streaming clients")
    cpu = _CpuTimes(server.proc.pid)
    results, t0, t1 = asyncio.run(_clients(server.base, model, prompts, o.max_tokens, o.concurrency,
                                           o.request_timeout_s))
    server_cpu, client_cpu = cpu.spent()
    ok = [r for r in results if r.error is None]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    ttft = [r.chunks[0] - r.sent for r in ok if r.chunks]
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:])]
    tpot = [(r.chunks[-1] - r.chunks[0]) / (r.completion_tokens - 1) for r in ok
            if len(r.chunks) > 1 and (r.completion_tokens or 0) > 1]
    errors = [r.error for r in results if r.error is not None]
    stats = {"seconds": round(t1 - t0, 3), "tokens": tokens, "tokens_per_s": _rate(tokens, t1 - t0),
             "completed": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
             "missing_usage": sum(r.completion_tokens is None for r in ok),
             "finish_reasons": _count(r.finish_reason for r in ok),
             "prompt_tokens": sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None}),
             "chunks": sum(len(r.chunks) for r in ok),
             "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl), "tpot_ms": percentiles(tpot),
             "server_cpu_s": server_cpu, "client_cpu_s": client_cpu}
    return stats, results


class _CpuTimes:
    """CPU seconds (user + system, all threads) the server process and this client process spend
    from now to ``spent()``: on a small machine the clients' share is what the server cannot use."""

    def __init__(self, pid: int):
        import psutil

        self.server = psutil.Process(pid)
        self.s0, self.c0 = self._server(), time.process_time()

    def _server(self) -> float:
        t = self.server.cpu_times()
        return t.user + t.system

    def spent(self) -> tuple[float, float]:
        return round(self._server() - self.s0, 2), round(time.process_time() - self.c0, 2)


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------ offline

def offline_side(ckpt: str, prompts, o: BenchOptions) -> tuple[dict, dict, list]:
    """The same requests through the engine as `tanuki generate` builds it (this process, one rank),
    twice: at most ``concurrency`` in flight, as the clients keep the server (the overhead
    baseline), and every request submitted at once, as `tanuki generate` runs a file. Returns
    (figures at the clients' concurrency, figures all at once, completions of the first)."""
    from types import SimpleNamespace

    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.inference.engine import Engine, EngineOptions, SamplingOptions
    from megatron_tanuki.inference.generate import load_model
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.checkpoint_meta import read_meta, resolve
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_single_process

    cfg, _, _ = read_meta(resolve(ckpt))
    init_single_process(ParallelLayout(), registry.language_model(cfg))  # a world of one, no TCP
    cfg, chunks, hf_vocab = load_model(SimpleNamespace(ckpt=ckpt, tp=1, pp=1, ep=1, dtype=None))
    tok = load_tokenizer(None)
    llm = registry.language_model(cfg)
    engine = Engine(chunks, tok, EngineOptions(max_sequence_length=o.max_seq_len or llm.max_position_embeddings,
                                               kv_memory_gb=o.kv_memory_gb, seed=o.seed),
                    vocab_limit=min(tok.vocab_size, hf_vocab), log=o.log)

    def run(ps, n, cap=None):
        requests = ((str(i), p, SamplingOptions(max_tokens=n, temperature=0.0), None) for i, p in enumerate(ps))
        return {int(c.key): c for c in engine.run(requests, max_waiting=cap)}

    def timed(label, cap):
        o.log(f"[bench] offline engine: {len(prompts)} requests, {label}")
        steps0 = engine.steps
        generate_bench._sync()
        t0, c0 = time.perf_counter(), time.process_time()
        done = run(prompts, o.max_tokens, cap)
        generate_bench._sync()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        out = [done[i] for i in range(len(prompts))]
        errors = [c.error for c in out if c.error is not None]
        tokens = sum(len(c.tokens) for c in out if c.error is None)
        return {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": _rate(tokens, seconds),
                "steps": engine.steps - steps0, "cpu_s": round(cpu, 2), "errors": len(errors), "first_error": errors[0] if errors else None,
                "finish_reasons": _count(c.finish_reason for c in out if c.error is None)}, out

    try:
        run(prompts[:2], 4)  # warm-up, as the server had
        same, out = timed(f"at most {o.concurrency} in flight (the clients' concurrency)", o.concurrency)
        free, _ = timed("all submitted (as tanuki generate)", None)
        same["attention_backend"] = engine.backend
    finally:
        engine.close()
    return same, free, out


# ------------------------------------------------------------------------------ the run

def run(o: BenchOptions) -> dict:
    check(o)
    shape = None if o.ckpt else (o.shape or generate_bench.default_shape())
    on_cpu = not torch.cuda.is_available()
    if o.threads is None and on_cpu:
        o.threads = generate_bench.SHAPES[shape].threads if shape else 1
    if o.threads and on_cpu:
        torch.set_num_threads(o.threads)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as folder:
        ckpt = o.ckpt or random_checkpoint(shape, folder, o.seed, o.log)
        from megatron_tanuki.data.tokenizer import load_tokenizer
        from megatron_tanuki.models import registry
        from megatron_tanuki.models.checkpoint_meta import read_meta, resolve

        cfg, dtype, hf_vocab = read_meta(resolve(ckpt))
        llm = registry.language_model(cfg)
        prompts = make_prompts(o.requests, o.prompt_len, min(load_tokenizer(None).vocab_size, hf_vocab), o.seed)
        result = {"shape": shape or "ckpt", "ckpt": o.ckpt,
                  "model": {k: getattr(llm, k) for k in ("hidden_size", "num_layers", "num_attention_heads",
                                                         "num_query_groups", "ffn_hidden_size", "vocab_size")},
                  "dtype": str(dtype).replace("torch.", ""),
                  "device": "cpu" if on_cpu else torch.cuda.get_device_name(),
                  "torch_threads": o.threads if on_cpu else None, "requests": o.requests,
                  "concurrency": o.concurrency, "prompt_len": o.prompt_len, "max_tokens": o.max_tokens,
                  "expected_tokens": o.requests * o.max_tokens}

        o.log("[bench] starting tanuki serve")
        server = Server(ckpt, o, os.path.join(folder, "serve.log"))
        try:
            startup = server.wait_ready(o.startup_timeout_s)
            o.log(f"[bench] server ready on {server.base} after {startup:.1f} s")
            srv, results = server_side(server, prompts, o)
        finally:
            code = server.stop()
        srv.update(startup_s=round(startup, 1), exit_code=code)
        if code != 0:
            o.log(f"[bench] tanuki serve exited with {code}; its output:\n{server.tail()}")
        result["server"] = srv

        off, free, completions = offline_side(ckpt, prompts, o)
        result["offline"], result["offline_all"] = off, free
    result["attention_backend"] = off.pop("attention_backend")
    result["server_vs_offline"] = round(srv["tokens_per_s"] / max(off["tokens_per_s"], 1e-9), 3)
    result["server_vs_offline_all"] = round(srv["tokens_per_s"] / max(free["tokens_per_s"], 1e-9), 3)
    result["same_as_offline"] = sum(r.error is None and c.error is None and r.text == c.text
                                    and r.completion_tokens == len(c.tokens) for r, c in zip(results, completions))
    return result


def format_result(r: dict) -> str:
    m, s, f, a = r["model"], r["server"], r["offline"], r["offline_all"]

    def lat(name, x):
        return f"{name} p50 {x['p50']} ms, p99 {x['p99']} ms (mean {x['mean']}, n={x['n']})"

    threads = f" ({r['torch_threads']} torch thread(s) each side)" if r["torch_threads"] else ""
    lines = [f"model {r['shape']}: hidden {m['hidden_size']}, {m['num_layers']} layers, {m['num_attention_heads']}/"
             f"{m['num_query_groups']} heads, FFN {m['ffn_hidden_size']}, vocab {m['vocab_size']}, {r['dtype']} on "
             f"{r['device']}{threads}, attention {r['attention_backend']}",
             f"{r['requests']} requests: {r['prompt_len']} prompt tokens, max_tokens {r['max_tokens']} (greedy), "
             f"{r['concurrency']} concurrent streaming clients",
             f"  server  {s['tokens_per_s']:10.1f} tok/s  {s['tokens']} tokens in {s['seconds']:.2f} s; "
             f"{s['completed']}/{r['requests']} completed, {s['errors']} errors, finish {s['finish_reasons']}; "
             f"started in {s['startup_s']} s, exit code {s['exit_code']}",
             f"          {lat('TTFT', s['ttft_ms'])}",
             f"          {lat('ITL ', s['itl_ms'])}; {s['chunks']} text chunks",
             f"          {lat('TPOT', s['tpot_ms'])}",
             f"          CPU: server process {s['server_cpu_s']} s, clients {s['client_cpu_s']} s",
             f"  offline {f['tokens_per_s']:10.1f} tok/s  {f['tokens']} tokens in {f['seconds']:.2f} s, "
             f"{f['steps']} engine steps, CPU {f['cpu_s']} s, finish {f['finish_reasons']} (at most {r['concurrency']} "
             "in flight)",
             f"  offline {a['tokens_per_s']:10.1f} tok/s  {a['tokens']} tokens in {a['seconds']:.2f} s, "
             f"{a['steps']} engine steps (all submitted, as tanuki generate)",
             f"  server / offline throughput at concurrency {r['concurrency']}: {r['server_vs_offline']:.3f} "
             f"(goal >= 0.9 at concurrency 64); vs offline all at once: {r['server_vs_offline_all']:.3f}",
             f"  same text and token count as offline: {r['same_as_offline']}/{r['requests']}"]
    if s["first_error"]:
        lines.append(f"  first server error: {s['first_error']}")
    return "\n".join(lines)


def write_json(r: dict, path: str) -> None:
    generate_bench.write_json(r, path)
