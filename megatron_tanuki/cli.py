"""`tanuki`: one command line for the project. Parses and dispatches, nothing else.

    tanuki model-info PRESET [--json]
    tanuki demo [--workdir runs/demo] [--quick] [--llm]
    tanuki convert hf-to-mcore --hf DIR --out DIR [--vision SIGLIP_DIR] [--overwrite]
    tanuki convert mcore-to-hf --ckpt DIR --out DIR [--overwrite]
    tanuki convert verify --hf DIR --ckpt DIR [--tp N --pp N --ep N] [--image FILE] [--vision DIR] [--json]
    tanuki train CONFIG.yaml [key=value ...] [--nproc N]
    tanuki upcycle --dense DIR --experts 8 --noise 0.001 --seed 0 --out DIR [--to hf|mcore]
"""
from __future__ import annotations

import argparse
import json
import signal
import sys


def cmd_model_info(args) -> int:
    from megatron_tanuki.models import registry

    info = registry.model_info(args.preset)
    if args.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        print(registry.format_model_info(info))
    return 0


def cmd_demo(args) -> int:
    if args.llm:
        from megatron_tanuki.demo import llm

        r = llm.main(steps=args.steps, seed=args.seed)
        return 0 if r["after"] < r["before"] else 1
    from megatron_tanuki.demo import vlm

    if args.data_only:
        import os

        from megatron_tanuki.demo import shapes

        paths = shapes.generate(os.path.join(args.workdir, "data"))
        print(f"tanuki demo: data in {os.path.dirname(paths['stage1'])}")
        return 0
    r = vlm.main(workdir=args.workdir, seed=args.seed, quick=args.quick)
    return 0 if r["ok"] else 1


def cmd_convert(args) -> int:
    import time

    from megatron_tanuki.convert import engine

    t0 = time.perf_counter()
    if args.direction == "hf-to-mcore":
        stats = engine.hf_to_mcore(args.hf, args.out, overwrite=args.overwrite, vision_dir=args.vision)
    else:
        stats = engine.mcore_to_hf(args.ckpt, args.out, overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    print(f"tanuki convert {args.direction}: {stats.tensors} HF tensors, {stats.bytes / 1e9:.3f} GB "
          f"in {dt:.1f} s ({stats.bytes / 1e9 / max(dt, 1e-9):.2f} GB/s) -> {args.out}")
    return 0


def cmd_verify(args) -> int:
    from megatron_tanuki.convert import verify

    r = verify.verify(args.hf, args.ckpt, tp=args.tp, pp=args.pp, ep=args.ep, text=args.text,
                      tolerance=args.tolerance, image=args.image, vision_dir=args.vision)
    print(verify.to_json(r) if args.json else verify.format_result(r))
    return 0 if r["ok"] else 1


def _train_rank(config: str, overrides: list) -> dict:
    """One rank of `tanuki train`; data and config errors come back as a message, not a traceback."""
    from megatron_tanuki.data.records import DataError, TooManyBadRecords
    from megatron_tanuki.train.loop import main_from_env

    try:
        return main_from_env(config, overrides)
    except (TooManyBadRecords, DataError, ValueError, FileNotFoundError, KeyError) as e:
        return {"error": f"{type(e).__name__}: {e.args[0] if isinstance(e, KeyError) and e.args else e}"}


def cmd_train(args) -> int:
    import os

    from megatron_tanuki.train.config import load
    from megatron_tanuki.train.loop import summary_json

    load(args.config, args.overrides)  # fail here, in one process, on a bad config
    launched = "RANK" in os.environ or ("SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ)
    if launched or args.nproc == 1:
        results = [_train_rank(args.config, args.overrides)]
    else:
        from megatron_tanuki.runtime.spawn import run_ranks

        results = run_ranks(_train_rank, args.nproc, args.config, args.overrides)
    errors = [r["error"] for r in results if r and "error" in r]
    if errors:
        print(f"tanuki train: error: {errors[0]}", file=sys.stderr)
        return 2
    if args.summary_json and results[0]:
        with open(args.summary_json, "w", encoding="utf-8") as f:
            f.write(summary_json(results[0]))
    return 0


def cmd_upcycle(args) -> int:
    from megatron_tanuki.convert import upcycle

    upcycle.upcycle(args.dense, args.out, experts=args.experts, topk=args.topk, noise=args.noise,
                    seed=args.seed, to=args.to, overwrite=args.overwrite)
    print(f"tanuki upcycle: {args.dense} -> {args.out} ({args.experts} experts, top-{args.topk}, "
          f"noise {args.noise}, seed {args.seed}, {args.to})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tanuki", description="Tanuki LLMs on Megatron-Core")
    sub = p.add_subparsers(dest="command", required=True)

    mi = sub.add_parser("model-info", help="parameter counts of a preset (built on the meta device)")
    mi.add_argument("preset")
    mi.add_argument("--json", action="store_true")
    mi.set_defaults(func=cmd_model_info)

    conv = sub.add_parser("convert", help="weights HF <-> megatron-core (streaming, CPU)")
    csub = conv.add_subparsers(dest="direction", required=True)
    h2m = csub.add_parser("hf-to-mcore", help="HF folder -> megatron-core torch_dist checkpoint")
    h2m.add_argument("--hf", required=True)
    h2m.add_argument("--vision", default=None, help="LLaVA-JP: the SigLIP folder, if the tower is not inside --hf")
    m2h = csub.add_parser("mcore-to-hf", help="megatron-core torch_dist checkpoint -> HF folder")
    m2h.add_argument("--ckpt", required=True)
    for sp in (h2m, m2h):
        sp.add_argument("--out", required=True)
        sp.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        sp.set_defaults(func=cmd_convert)

    ver = csub.add_parser("verify", help="logits of the checkpoint under a layout vs transformers")
    ver.add_argument("--hf", required=True)
    ver.add_argument("--ckpt", required=True)
    for name in ("tp", "pp", "ep"):
        ver.add_argument(f"--{name}", type=int, default=1)
    ver.add_argument("--text", default=None, help="input text (default: a Japanese sentence; for a VLM "
                     "'<image>' plus a question)")
    ver.add_argument("--image", default=None, help="VLM: an image file (default: a generated test image)")
    ver.add_argument("--vision", default=None, help="VLM: the SigLIP folder, if not inside --hf")
    ver.add_argument("--tolerance", type=float, default=1e-4)
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=cmd_verify)

    up = sub.add_parser("upcycle", help="dense Tanuki-8B -> Tanuki-8x8B MoE (the seed recipe)")
    up.add_argument("--dense", required=True)
    up.add_argument("--out", required=True)
    up.add_argument("--experts", type=int, default=8)
    up.add_argument("--topk", type=int, default=2)
    up.add_argument("--noise", type=float, default=0.001)
    up.add_argument("--seed", type=int, default=0)
    up.add_argument("--to", choices=["hf", "mcore"], default="hf")
    up.add_argument("--overwrite", action="store_true")
    up.set_defaults(func=cmd_upcycle)

    tr = sub.add_parser("train", help="pretrain / SFT / VLM stage 1-2 from a YAML config (examples/)")
    tr.add_argument("config")
    tr.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4")
    tr.add_argument("--nproc", type=int, default=1,
                    help="start N local ranks (CPU/gloo or one node); not needed under torchrun or srun")
    tr.add_argument("--summary-json", default=None, help="write the run summary (rank 0) here")
    tr.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="the main job on a small embedded default (CPU, 2 ranks)")
    d.add_argument("--workdir", default="runs/demo", help="data, checkpoints and the export go here")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke run, not a result)")
    d.add_argument("--data-only", action="store_true", help="only write the generated dataset")
    d.add_argument("--llm", action="store_true", help="the earlier text-only MoE demo instead")
    d.add_argument("--steps", type=int, default=60, help="--llm: training steps")
    d.set_defaults(func=cmd_demo)
    return p


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    from megatron_tanuki.runtime.distributed import LayoutError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train":  # key=value overrides may come before or after options
        bad = [e for e in extra if "=" not in e or e.startswith("-")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = args.overrides + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Slurm's time limit and scancel send SIGTERM: turn it into an exception so that unfinished
    # OUT.tmp-* folders are removed on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except (LayoutError, KeyError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tanuki {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
