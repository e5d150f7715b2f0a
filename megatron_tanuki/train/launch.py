"""`tanuki train` itself: its options, and how it becomes ranks (already under a launcher, or N
local ranks started here).

Used by the CLI, by ``python -m megatron_tanuki.train`` (torchrun) and by the demo (which runs each
stage as `tanuki train` would), so none of them imports another.
"""
from __future__ import annotations

import os
import sys

from megatron_tanuki.runtime.spawn import launcher_rank  # noqa: F401  (re-exported: train.launch.launcher_rank)

def add_arguments(p) -> None:
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", default=[], help="section.key=value, e.g. train.lr=1e-4")
    p.add_argument("--nproc", type=int, default=None,
                   help="start N local ranks (CPU/gloo or one node); not needed under torchrun or srun")
    p.add_argument("--summary-json", default=None, help="write the run summary (rank 0) here")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML, every default filled in) and exit")


def merge_overrides(args, extra: list, error) -> None:
    """Overrides may come before or after the options (argparse leaves the later ones in
    ``extra``); anything else in ``extra`` goes to ``error`` (``parser.error``)."""
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad:
        error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = args.overrides + extra


def command(args) -> int:
    """Run `tanuki train` from parsed arguments; ``args.run_dir`` is set to where a crash log goes."""
    from megatron_tanuki.train.config import load

    cfg = load(args.config, args.overrides)  # fail here, in one process, on a bad config
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return 0
    args.run_dir = cfg.checkpoint.dir
    results = run(args.config, args.overrides, args.nproc, warn=lambda m: print(m, file=sys.stderr))
    errors = [r["error"] for r in results if r and "error" in r]
    if errors:
        print(f"tanuki train: error: {errors[0]}", file=sys.stderr)
        return 2
    if args.summary_json and results[0]:
        from megatron_tanuki.train.loop import summary_json

        with open(args.summary_json, "w", encoding="utf-8") as f:
            f.write(summary_json(results[0]))
    return 0


def train_rank(config: str, overrides: list) -> dict:
    """One rank of `tanuki train`. A user error (bad config, bad data) comes back as
    ``{"error": message}``; anything else propagates with its traceback."""
    from megatron_tanuki.runtime import cpu
    from megatron_tanuki.runtime.crash import user_message
    from megatron_tanuki.train.loop import main_from_env

    cpu.activate()
    try:
        return main_from_env(config, overrides)
    except Exception as e:
        msg = user_message(e)
        if msg is None:
            raise
        return {"error": f"{type(e).__name__}: {msg}"}


def run(config: str, overrides: list, nproc: int | None, warn=print) -> list:
    """Results of every local rank (one entry when a launcher started this process).

    ``nproc`` under a launcher is ignored with a warning: the launcher already chose the ranks.
    """
    rank = launcher_rank()
    if rank is not None:
        if nproc is not None and rank == "0":
            warn(f"tanuki train: warning: --nproc {nproc} ignored: this process is rank {rank} of "
                 f"{os.environ.get('WORLD_SIZE') or os.environ.get('SLURM_NTASKS', '?')} started by "
                 f"{'torchrun' if 'RANK' in os.environ else 'srun'}")
        return [train_rank(config, overrides)]
    if (nproc or 1) == 1:
        return [train_rank(config, overrides)]
    from megatron_tanuki.runtime.spawn import run_ranks

    return run_ranks(train_rank, nproc, config, overrides)
