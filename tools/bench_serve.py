#!/usr/bin/env python
"""`tanuki serve` under concurrent streaming clients (loopback) beside the same engine offline on the
same requests: throughput, TTFT, inter-token latency, and the server/offline ratio. Thin wrapper:
see megatron_tanuki/serve/bench.py.

    python tools/bench_serve.py                                   # small random model on CPU (~2-3 min)
    python tools/bench_serve.py --concurrency 64 --requests 192 --json out.json
    python tools/bench_serve.py --ckpt CKPT --prompt-len 128 --max-tokens 256
"""
import argparse
import sys

from megatron_tanuki.inference import bench as generate_bench
from megatron_tanuki.serve import bench


def parse(argv=None):
    d = bench.BenchOptions()
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--shape", choices=sorted(generate_bench.SHAPES), default=None,
                   help="random weights of this shape (default: tanuki-8b on a GPU, cpu otherwise)")
    p.add_argument("--ckpt", default=None, help="serve this checkpoint instead of random weights")
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="streaming clients at once")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help="random prompt token ids per request")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="output tokens per request (fewer at EOS)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads on each side (default 1 on CPU)")
    p.add_argument("--kv-memory-gb", type=float, default=None, help="KV cache on both sides (default: the engine's)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context on both sides (default: the model's)")
    p.add_argument("--startup-timeout", type=float, default=d.startup_timeout_s, help="seconds to wait for /health")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    r = bench.run(bench.BenchOptions(shape=a.shape, ckpt=a.ckpt, requests=a.requests, concurrency=a.concurrency,
                                     prompt_len=a.prompt_len, max_tokens=a.max_tokens, seed=a.seed, threads=a.threads,
                                     kv_memory_gb=a.kv_memory_gb, max_seq_len=a.max_seq_len,
                                     startup_timeout_s=a.startup_timeout))
    print(bench.format_result(r), flush=True)
    if a.json:
        bench.write_json(r, a.json)
    return 0 if r["server"]["exit_code"] == 0 and r["server"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
