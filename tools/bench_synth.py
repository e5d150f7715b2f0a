#!/usr/bin/env python
"""The synth pipeline's tokens/s against its backend's ceiling and against the seed team's
stage-barrier schedule. Thin wrapper: see megatron_tanuki/synth/bench.py.

    python tools/bench_synth.py                                   # both: tiny engine (CPU) and a fake server
    python tools/bench_synth.py --backend fake --latency 2.0 --conversations 256 --concurrency 64
    python tools/bench_synth.py --backend openai --base-url http://node1:8000/v1 --conversations 512
"""
import argparse
import json
import sys

from megatron_tanuki.synth import bench


def parse(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--backend", choices=["engine", "fake", "openai", "all"], default="all")
    p.add_argument("--conversations", type=int, default=None, help="default: 48 (engine), 192 (fake/openai)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default: 16 engine, 64 http)")
    p.add_argument("--batch", type=int, default=96, help="the barrier schedule's batch (the seed team's 96)")
    p.add_argument("--max-tokens", type=int, default=None, help="answer length (default: 16 engine, 512 fake)")
    p.add_argument("--shape", default="cpu", help="engine: an inference-bench model shape (cpu, tiny, tanuki-8b)")
    p.add_argument("--latency", type=float, default=1.0,
                   help="fake: mean seconds per answer (lognormal spread, as a loaded teacher server)")
    p.add_argument("--base-url", action="append", default=[], help="openai: the server(s)")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megatron_tanuki.runtime import cpu

    cpu.activate()
    args = parse(argv)
    out = {}
    kinds = ["engine", "fake"] if args.backend == "all" else [args.backend]
    for kind in kinds:
        n = args.conversations or (48 if kind == "engine" else 192)
        conc = args.concurrency or (16 if kind == "engine" else 64)
        tokens = args.max_tokens or (16 if kind == "engine" else 512)
        recipe = bench.recipe_for_bench(tokens, count=n)
        if kind == "engine":
            backend = bench.engine_backend_for_bench(args.shape, batch=conc, max_len=1024)
            r = bench.compare(recipe, backend, n, args.batch)
            backend.close()
        elif kind == "fake":
            from megatron_tanuki.synth.fake_server import FakeServer, lognormal_latency
            from megatron_tanuki.synth.http_backend import OpenAIBackend

            with FakeServer(latency=lognormal_latency(args.latency), completion_tokens=tokens) as srv:
                with OpenAIBackend([srv.url], concurrency=conc, min_concurrency=conc, max_concurrency=conc) as be:
                    r = bench.compare(recipe, be, n, args.batch)
            r["fake_latency_mean_s"] = args.latency
        else:
            from megatron_tanuki.synth.http_backend import OpenAIBackend

            if not args.base_url:
                sys.exit("--backend openai needs --base-url")
            with OpenAIBackend(args.base_url, concurrency=conc, min_concurrency=conc, max_concurrency=conc) as be:
                r = bench.compare(recipe, be, n, args.batch)
        r.update(backend=kind, concurrency=conc, max_tokens=tokens)
        print(f"\n== {kind}: {n} conversations x {r['turns']} turns, {conc} in flight, {tokens} tokens per answer")
        print(bench.format_result(r))
        out[kind] = r
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
