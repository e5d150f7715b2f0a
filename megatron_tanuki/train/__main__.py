"""``torchrun --nproc-per-node 8 -m megatron_tanuki.train CONFIG.yaml [key=value ...]`` (or under srun)."""
import sys

from megatron_tanuki.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
