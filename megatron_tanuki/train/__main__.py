"""``torchrun --nproc-per-node 8 -m megatron_tanuki.train CONFIG.yaml [key=value ...]`` (or under srun).

The same command as `tanuki train`, without going through the CLI module (which sits above train).
"""
import argparse
import sys

from megatron_tanuki.runtime import crash
from megatron_tanuki.train import launch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_tanuki.train",
                                description="one rank of `tanuki train` under torchrun or srun")
    launch.add_arguments(p)
    args, extra = p.parse_known_args(argv)
    launch.merge_overrides(args, extra, p.error)
    crash.exit_on_sigterm()
    try:
        return launch.command(args)
    except Exception as e:
        return crash.report("tanuki train", e, getattr(args, "run_dir", None))


if __name__ == "__main__":
    sys.exit(main())
