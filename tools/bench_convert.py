#!/usr/bin/env python
"""HF <-> Megatron conversion throughput and peak RSS beside a raw safetensors read+write.
Thin wrapper: see megatron_tanuki/convert/bench.py.

    python tools/bench_convert.py                  # 1 full-width Tanuki-8x8B layer (~3.9 GB)
    python tools/bench_convert.py --layers 2 --workdir /scratch --json
"""
import sys

from megatron_tanuki.convert.bench import main

if __name__ == "__main__":
    sys.exit(main())
