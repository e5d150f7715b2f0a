"""`tanuki`: one command line for the project. Parses and dispatches, nothing else.

    tanuki model-info PRESET [--json]
    tanuki demo [--steps N]
    tanuki convert hf-to-mcore --hf DIR --out DIR [--vision SIGLIP_DIR] [--overwrite]
    tanuki convert mcore-to-hf --ckpt DIR --out DIR [--overwrite]
    tanuki convert verify --hf DIR --ckpt DIR [--tp N --pp N --ep N] [--image FILE] [--vision DIR] [--json]
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
    from megatron_tanuki import demo

    r = demo.main(steps=args.steps, seed=args.seed)
    return 0 if r["after"] < r["before"] else 1


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

    d = sub.add_parser("demo", help="the main job on a small embedded default (CPU, 2 ranks)")
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return p


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    from megatron_tanuki.runtime.distributed import LayoutError

    args = build_parser().parse_args(argv)
    # Slurm's time limit and scancel send SIGTERM: turn it into an exception so that unfinished
    # OUT.tmp-* folders are removed on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except (LayoutError, KeyError, ValueError, FileNotFoundError, FileExistsError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"tanuki {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
