#!/usr/bin/env python
"""Conversion throughput and peak RSS beside a raw read+write: HF <-> Megatron (default), or a NeMo
zarr folder (Nemotron-4 release format) -> Megatron with ``--source nemo``.
Thin wrapper: see megatron_tanuki/convert/bench.py.

    python tools/bench_convert.py                  # 1 full-width Tanuki-8x8B layer (~3.9 GB)
    python tools/bench_convert.py --layers 2 --workdir /scratch --json
    python tools/bench_convert.py --source nemo    # nemotron4-bench: 16 layers, hidden 2048, 1.7 GB
    python tools/bench_convert.py --source nemo --preset nemotron4-15b --layers 1 --workdir /scratch
"""
import sys

from megatron_tanuki.convert.bench import main

if __name__ == "__main__":
    sys.exit(main())
