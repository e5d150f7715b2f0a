#!/usr/bin/env python
"""The inference engine beside transformers `generate` on the same weights and prompts, and against
itself without continuous batching. Thin wrapper: see megatron_tanuki/inference/bench.py.

    python tools/bench_generate.py                                  # small model on CPU, Tanuki-8B on a GPU
    python tools/bench_generate.py --shape tanuki-8b --workloads mixed,uniform --json out.json
    python tools/bench_generate.py --shape tiny --requests 6 --batch 2 --prompt-len 16 --out-min 2 --out-max 12
"""
import argparse
import sys

from megatron_tanuki.inference import bench


def parse(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--shape", choices=sorted(bench.SHAPES), default=None,
                   help="model shape (default: tanuki-8b on a GPU, cpu otherwise)")
    p.add_argument("--workloads", default="mixed,uniform",
                   help="comma list of mixed (lengths out-min..out-max) and uniform (one batch, all out-max)")
    p.add_argument("--requests", type=int, default=None, help="requests of the mixed workload (default: the shape's)")
    p.add_argument("--batch", type=int, default=None, help="requests in flight / HF batch size (default: the shape's)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--out-min", type=int, default=16)
    p.add_argument("--out-max", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=("checkpoint", "memory"), default=None,
                   help="checkpoint: save HF, hf_to_mcore, load; memory: the same table without disk "
                        "(default: the shape's)")
    p.add_argument("--kv-memory-gb", type=float, default=None, help="default: what the batch needs")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the shape's; 1 on CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    r = bench.run(shape=a.shape, workloads=tuple(w for w in a.workloads.split(",") if w), requests=a.requests,
                  batch=a.batch, prompt_len=a.prompt_len, out_min=a.out_min, out_max=a.out_max, seed=a.seed,
                  weights=a.weights, kv_memory_gb=a.kv_memory_gb,
                  threads=a.threads)
    print(bench.format_result(r), flush=True)
    if a.json:
        bench.write_json(r, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
