#!/usr/bin/env python
"""Thin wrapper over `tanuki convert` (same arguments):

    python tools/convert_checkpoint.py hf-to-mcore --hf ./Tanuki-8x8B-dpo-v1.0 --out ./ckpt/tanuki-8x8b
    python tools/convert_checkpoint.py mcore-to-hf --ckpt ./ckpt/tanuki-8x8b --out ./hf/tanuki-8x8b
    python tools/convert_checkpoint.py verify --hf ./Tanuki-8x8B-dpo-v1.0 --ckpt ./ckpt/tanuki-8x8b --tp 2 --ep 2
"""
import sys

from megatron_tanuki.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
