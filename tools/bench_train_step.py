#!/usr/bin/env python
"""Forward+backward timing of a Tanuki-8x8B-shaped block. Thin wrapper: see megatron_tanuki/bench.py.

    python tools/bench_train_step.py                       # tiny on CPU, full width on a GPU: grouped vs
                                                           # sequential experts (+ TE where it runs), data wait
    python tools/bench_train_step.py --layers 2 --seq 4096 --batch 1 --json
    python tools/bench_train_step.py --experts grouped     # one expert path: grouped | sequential | te | both
    python tools/bench_train_step.py --no-data-wait        # the step only, no GPTDataset / prefetch timing
    python tools/bench_train_step.py --vlm                 # Tanuki-vision: tower + S2 + projector + LLM layers
"""
import sys

from megatron_tanuki.bench import main

if __name__ == "__main__":
    sys.exit(main())
