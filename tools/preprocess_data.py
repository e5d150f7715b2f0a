#!/usr/bin/env python
"""Megatron-LM's `tools/preprocess_data.py`, our way: a thin wrapper of `tanuki preprocess-data`.

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/ja_web --workers 16
"""
import sys

from megatron_tanuki.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess-data", *sys.argv[1:]]))
