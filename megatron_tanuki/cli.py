"""`tanuki`: one command line for the project. Parses and dispatches, nothing else.

    tanuki --version
    tanuki model-info PRESET [--json] | tanuki model-info --list [--json]
    tanuki model-info PRESET --plan tp=N,pp=N [--kv-tokens N] [--gpu h100|h200 | --gpu-memory-gb G]
                      [--dtype bf16|fp8] [--reserve-gb R] [--json]
    tanuki demo [--workdir runs/demo] [--quick] [--llm]
    tanuki convert hf-to-mcore --hf DIR --out DIR [--vision SIGLIP_DIR] [--overwrite]
    tanuki convert mcore-to-hf --ckpt DIR --out DIR [--overwrite]
    tanuki convert nemo-to-mcore --nemo DIR --out DIR [--dtype bf16|fp32|fp16] [--overwrite]
    tanuki convert verify --hf DIR --ckpt DIR [--tp N --pp N --ep N] [--dtype bf16] [--layers N]
                          [--memory-budget-gb GB] [--text T] [--image FILE] [--vision DIR] [--json]
    tanuki train CONFIG.yaml [key=value ...] [--nproc N] [--print-config]
    tanuki generate --ckpt CKPT --input IN.jsonl --output OUT.jsonl [--tp N --pp N --ep N | --nproc N]
                    [--max-tokens N --temperature T --top-p P --top-k K --seed S] [--chat NAME]
                    [--stop STR ...] [--kv-memory-gb GB] [--score yes,no [--prompt-logprobs]] [--logprobs]
    tanuki serve --ckpt CKPT [--tp N --pp N --ep N | --nproc N] [--host 127.0.0.1 --port 8000] [--api-key KEY]
                 [--served-model-name NAME] [--max-concurrency N] [--max-prompt-tokens N] [--max-tokens-limit N]
    tanuki score-reward --ckpt CKPT --input CONV.jsonl --output SCORED.jsonl [--tp N --pp N] [--batch-size N]
    tanuki synth run RECIPE.yaml --out DIR [--limit N] [--shard i/n] [--backend engine --ckpt CKPT --tp N --pp N --ep N
                     | --backend openai --base-url URL [--base-url URL2 ...] [--api-key-env VAR] [--model NAME]]
    tanuki synth run --print-recipe
    tanuki synth dpo RECIPE.yaml [--out DIR] [--limit N]
    tanuki synth captions RECIPE.yaml [--images DIR_OR_JSONL] [--out DIR] [--ckpt CKPT --tp N --pp N --ep N] [--limit N]
    tanuki synth filter OUT_DIR [--dedup] [--lang ja] [--ask-llm CKPT_OR_URL [--threshold P | --keep-top F]]
    tanuki synth merge DIR [DIR ...] --out DIR
    tanuki synth export OUT_DIR --to hf-dataset DEST [--include-rejected] [--overwrite]
    tanuki preprocess-data --input 'corpus/*.jsonl' --output-prefix data/ja_web [--workers 16] [--json-key text]
                           [--no-append-eod] [--tokenizer PATH] [--overwrite]
    tanuki upcycle --dense DIR --experts 8 --noise 0.001 --seed 0 --out DIR [--to hf|mcore]

A user error is one line on stderr (exit 2); a crash also keeps its traceback in a
tanuki-crash-*.log beside the run (exit 1; TANUKI_DEBUG=1 prints it too).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from megatron_tanuki.runtime import crash
from megatron_tanuki.train import launch


def version() -> str:
    """Ours and the versions that decide numerics, for bug reports (read from metadata: no imports)."""
    from importlib import metadata

    import megatron_tanuki

    def v(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{d} {v(d)}" for d in ("megatron-core", "torch", "transformers", "transformer-engine"))
    return f"tanuki {megatron_tanuki.__version__} ({deps})"


class _Version(argparse.Action):
    """argparse's own version action re-wraps the line; this prints it as is."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version())
        parser.exit()


def cmd_model_info(args) -> int:
    from megatron_tanuki.models import plan, registry

    if plan.wanted(args):
        return plan.run_plan(args)

    if args.list:
        rows = [registry.model_info(name) for name in registry.PRESETS]
        rows = [{"preset": i["preset"], "architecture": i["architecture"], "total": i["parameters"]["total"]}
                for i in rows]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['preset']:<24} {r['architecture']:<13} {r['total']:>15,} parameters")
        return 0
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
    elif args.direction == "nemo-to-mcore":
        from megatron_tanuki.convert import nemo

        stats = nemo.nemo_to_mcore(args.nemo, args.out, overwrite=args.overwrite, dtype=args.dtype)
    else:
        stats = engine.mcore_to_hf(args.ckpt, args.out, overwrite=args.overwrite)
    dt = time.perf_counter() - t0
    print(f"tanuki convert {args.direction}: {stats.tensors} source tensors, {stats.bytes / 1e9:.3f} GB "
          f"in {dt:.1f} s ({stats.bytes / 1e9 / max(dt, 1e-9):.2f} GB/s) -> {args.out}")
    return 0


def cmd_verify(args) -> int:
    from megatron_tanuki.convert import verify

    r = verify.verify(args.hf, args.ckpt, tp=args.tp, pp=args.pp, ep=args.ep, text=args.text,
                      tolerance=args.tolerance, image=args.image, vision_dir=args.vision, dtype=args.dtype,
                      layers=args.layers, memory_budget_gb=args.memory_budget_gb)
    print(verify.to_json(r) if args.json else verify.format_result(r))
    return 0 if r["ok"] else 1


def cmd_upcycle(args) -> int:
    from megatron_tanuki.convert import upcycle

    upcycle.upcycle(args.dense, args.out, experts=args.experts, topk=args.topk, noise=args.noise,
                    seed=args.seed, to=args.to, overwrite=args.overwrite)
    print(f"tanuki upcycle: {args.dense} -> {args.out} ({args.experts} experts, top-{args.topk}, "
          f"noise {args.noise}, seed {args.seed}, {args.to})")
    return 0


def cmd_generate(args) -> int:
    from megatron_tanuki.inference.generate import GenerateJob, run

    if args.score is not None and not any(w.strip() for w in args.score.split(",")):
        raise ValueError(f"--score {args.score!r}: give comma-separated one-token answers, e.g. yes,no")
    job = GenerateJob(
        ckpt=args.ckpt, input=args.input, output=args.output, tp=args.tp, pp=args.pp, ep=args.ep, nproc=args.nproc,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, chat=args.chat, stop=tuple(args.stop or ()), logprobs=args.logprobs,
        kv_memory_gb=args.kv_memory_gb, max_seq_len=args.max_seq_len, max_tokens_per_step=args.max_tokens_per_step,
        score=tuple(w for w in (args.score or "").split(",") if w), prompt_logprobs=args.prompt_logprobs,
        tokenizer=args.tokenizer, dtype=args.dtype, fp8=args.fp8)
    args.run_dir = os.path.dirname(os.path.abspath(args.output))
    r = run(job)[0]
    print(f"tanuki generate: {r['requests']} request(s) ({r['errors']} error record(s)), "
          f"{r['completion_tokens']} tokens in {r['steps']} engine steps, {r['seconds']} s; "
          f"{r['skipped']} already in {args.output}; attention backend {r['backend']}")
    return 0


def cmd_score_reward(args) -> int:
    from megatron_tanuki.inference.reward import RewardJob, run

    job = RewardJob(ckpt=args.ckpt, input=args.input, output=args.output, tp=args.tp, pp=args.pp, nproc=args.nproc,
                    batch_size=args.batch_size, tokenizer=args.tokenizer, dtype=args.dtype)
    args.run_dir = os.path.dirname(os.path.abspath(args.output))
    r = run(job)[0]
    print(f"tanuki score-reward: {r['scored']} conversation(s) scored, {r['errors']} error record(s), "
          f"{r['skipped']} already in {args.output}; {r['seconds']} s")
    return 0


def cmd_serve(args) -> int:
    from megatron_tanuki.serve.options import ServeOptions
    from megatron_tanuki.serve.server import run

    fields = ServeOptions.__dataclass_fields__
    opts = ServeOptions(**{k: v for k, v in vars(args).items() if k in fields})
    run(opts)
    print("tanuki serve: stopped", file=sys.stderr)
    return 0


def cmd_synth_run(args) -> int:
    from megatron_tanuki.synth import job as synth

    if args.print_recipe:
        print(synth.print_recipe(), end="")
        return 0
    if not args.recipe or not args.out:
        raise ValueError("tanuki synth run: give RECIPE and --out DIR (or --print-recipe)")
    fields = synth.SynthJob.__dataclass_fields__
    job = synth.SynthJob(**{k: v for k, v in vars(args).items() if k in fields})
    args.run_dir = args.out
    r = synth.run(job)[0]
    line = (f"tanuki synth run: {r['completed']} conversation(s) written, {r['rejected']} rejected, "
            f"{r['skipped']} already done, {r['abandoned']} left for the rerun; {r['completion_tokens']} tokens in "
            f"{r['seconds']} s ({r['tokens_per_s']} tok/s)")
    if "efficiency" in r:
        line += f", {100 * r['efficiency']:.1f}% of the {r['ceiling_tokens_per_s']} tok/s ceiling"
    print(line)
    return 0


def cmd_synth_merge(args) -> int:
    from megatron_tanuki.synth.merge import merge

    r = merge(args.dirs, args.out, limit=args.limit)
    print(f"tanuki synth merge: {r['records']} conversation(s) from {r['files']} shard file(s) -> {args.out}; "
          f"every id of {r['expected']} slot(s) exactly once ({r['rejected']} in rejects)")
    return 0


def cmd_synth_captions(args) -> int:
    from megatron_tanuki.synth.captions import run_captions

    args.run_dir = args.out
    r = run_captions(args.recipe, images=args.images, out=args.out, ckpt=args.ckpt, tp=args.tp, pp=args.pp,
                     ep=args.ep, limit=args.limit, kv_memory_gb=args.kv_memory_gb, max_seq_len=args.max_seq_len,
                     dtype=args.dtype, fp8=args.fp8, tokenizer=args.tokenizer,
                     max_tokens_per_step=args.max_tokens_per_step, grace_s=args.grace_s)
    line = (f"tanuki synth captions: {r['answered']} answer(s), {r['rejected']} rejected, {r['skipped']} already done, "
            f"{r['left']} left for the rerun; {r['completion_tokens']} tokens in {r['seconds']} s "
            f"({r['tokens_per_s']} tok/s)")
    if r["stage2"]:
        line += (f"\n  vlm_stage1: {r['stage1']} ({r['stage1_records']} image(s))\n  vlm_stage2: {r['stage2']} "
                 f"({r['stage2_records']} record(s))\n  data.image_folder: {r['image_folder']}")
    print(line)
    return 0


def cmd_synth_export(args) -> int:
    from megatron_tanuki.synth.export import export_hf_dataset

    r = export_hf_dataset(args.out_dir, args.dest, include_rejected=args.include_rejected, overwrite=args.overwrite)
    filtered = f", {r['filtered_out']} filtered out" if r["filtered"] else ""
    print(f"tanuki synth export: {r['rows']} conversation(s) -> {r['dest']} (datasets.load_from_disk), "
          f"{r['rejected']} rejected by the run{filtered}; dataset card {r['dest']}/README.md")
    return 0


def cmd_synth_filter(args) -> int:
    from megatron_tanuki.synth.filters import run_filter

    r = run_filter(args.out_dir, dedup=args.dedup, lang=args.lang, ask_llm=args.ask_llm, threshold=args.threshold,
                   keep_top=args.keep_top, tp=args.tp, pp=args.pp, ep=args.ep, nproc=args.nproc)
    why = ", ".join(f"{n} {kind}" for kind, n in r["dropped_by_reason"].items()) or "none"
    print(f"tanuki synth filter: {r['kept']} of {r['rows']} row(s) kept, {r['dropped']} dropped ({why}) -> "
          f"{os.path.join(args.out_dir, 'filtered', 'data.jsonl')}")
    return 0


def cmd_synth_dpo(args) -> int:
    from megatron_tanuki.synth.dpo import run_dpo

    args.run_dir = args.out
    r = run_dpo(args.recipe, args.out, limit=args.limit)
    if r:  # rank 0 (the other ranks of a launch return nothing)
        why = ", ".join(f"{n} {reason}" for reason, n in r["rejects"].items() if n) or "none"
        print(f"tanuki synth dpo: {r['pairs']} pair(s) from consistent verdicts, {r['rejected']} rejected ({why}), "
              f"{r['undecided']} undecided (a rerun asks again), of {r['questions']} question(s)")
    return 0


def cmd_preprocess_data(args) -> int:
    from megatron_tanuki.data.indexed import preprocess

    args.run_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    r = preprocess(args.input, args.output_prefix, json_key=args.json_key, workers=args.workers,
                   append_eod=args.append_eod, tokenizer=args.tokenizer, overwrite=args.overwrite)
    bad = ", ".join(f"{n} {kind}" for kind, n in sorted(r["bad"].items())) or "none"
    print(f"tanuki preprocess-data: {r['documents']} document(s), {r['tokens']} tokens ({r['dtype']}) from "
          f"{r['files']} file(s) in {r['seconds']} s ({r['docs_per_s']} docs/s, {r['tokens_per_s']} tokens/s); "
          f"bad lines: {bad} -> {r['prefix']}.bin/.idx (the path for data.blend: {r['prefix']})")
    return 0


def _synth_parser(sub) -> None:
    sy = sub.add_parser("synth", help="persona-driven synthetic conversations: run, filter, dpo, captions, export")
    ssub = sy.add_subparsers(dest="synth_command", required=True)
    r = ssub.add_parser("run", help="a recipe's conversations against a teacher (resumable, --shard i/n)")
    r.add_argument("recipe", nargs="?", help="the recipe YAML (examples/synth_*.yaml)")
    r.add_argument("--out", help="output folder (data/, rejects/; a rerun skips what is done)")
    r.add_argument("--print-recipe", action="store_true", help="print the recipe schema, every field explained")
    r.add_argument("--limit", type=int, default=None, help="at most N conversation slots (try a recipe small)")
    r.add_argument("--shard", default="0/1", help="i/n: this job's deterministic slice of the ids (Slurm arrays)")
    r.add_argument("--backend", choices=["engine", "openai"], default=None,
                   help="engine (in-process, --ckpt) or openai (--base-url); default: openai when --base-url is given")
    r.add_argument("--ckpt", default=None, help="--backend engine: the teacher checkpoint")
    for name in ("tp", "pp", "ep"):
        r.add_argument(f"--{name}", type=int, default=1)
    r.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    r.add_argument("--fp8", choices=["e4m3", "hybrid"], default=None)
    r.add_argument("--tokenizer", default=None)
    r.add_argument("--kv-memory-gb", type=float, default=None)
    r.add_argument("--max-seq-len", type=int, default=None)
    r.add_argument("--max-tokens-per-step", type=int, default=8192)
    r.add_argument("--base-url", dest="base_urls", action="append", default=[],
                   help="an OpenAI-compatible server, e.g. http://node1:8000/v1 (repeat for several)")
    r.add_argument("--api-key-env", default=None, help="the environment variable holding the API key")
    r.add_argument("--model", default=None, help="the served model name (default: the server's first)")
    r.add_argument("--concurrency", type=int, default=64, help="openai: starting requests in flight (adapts)")
    r.add_argument("--timeout", dest="timeout_s", type=float, default=600.0, help="openai: seconds per request")
    r.add_argument("--ceiling-tps", type=float, default=None,
                   help="the backend's tokens/s at saturation (tools/bench_generate.py): the summary's efficiency")
    r.add_argument("--grace", dest="grace_s", type=float, default=120.0,
                   help="after SIGTERM/SIGUSR1, seconds for running conversations to finish")
    r.set_defaults(func=cmd_synth_run)
    dp = ssub.add_parser("dpo", help="preference pairs: 2 policy answers, the teacher judges twice (order swapped)")
    dp.add_argument("recipe", help="a recipe with a dpo: section (examples/synth_dpo_tanuki.yaml)")
    dp.add_argument("--out", default=None, help="output folder (default: dpo.out, else <name>_dpo beside the questions)")
    dp.add_argument("--limit", type=int, default=None, help="only the first N questions")
    dp.set_defaults(func=cmd_synth_dpo)
    c = ssub.add_parser("captions", help="a vision model answers the recipe's questions per image -> LLaVA JSON "
                                         "for vlm_stage1/2 (resumable)")
    c.add_argument("recipe", help="a recipe with a captions: section (examples/synth_captions_tanuki_vision.yaml)")
    c.add_argument("--images", default=None,
                   help="a folder (every .jpg/.jpeg/.png/.webp, recursively) or a JSONL of {\"image\"}; "
                        "default: captions.images")
    c.add_argument("--out", default=None, help="output folder (default: captions.out; a rerun asks only what is left)")
    c.add_argument("--ckpt", default=None, help="the vision model's checkpoint (default: captions.model.ckpt)")
    for name in ("tp", "pp", "ep"):
        c.add_argument(f"--{name}", type=int, default=1)
    c.add_argument("--limit", type=int, default=None, help="only the first N images (try a recipe small)")
    c.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    c.add_argument("--fp8", choices=["e4m3", "hybrid"], default=None)
    c.add_argument("--tokenizer", default=None)
    c.add_argument("--kv-memory-gb", type=float, default=None)
    c.add_argument("--max-seq-len", type=int, default=None)
    c.add_argument("--max-tokens-per-step", type=int, default=8192)
    c.add_argument("--grace", dest="grace_s", type=float, default=120.0,
                   help="after SIGTERM/SIGUSR1, seconds for the answers in flight to finish")
    c.set_defaults(func=cmd_synth_captions)
    f = ssub.add_parser("filter", help="dedup, Japanese check, Ask-LLM over a run's data: keep/drop with reasons")
    f.add_argument("out_dir", help="a `tanuki synth run` output folder (data/*.jsonl; settings: recipe.yaml filters:)")
    f.add_argument("--dedup", action="store_true", help="exact on normalized Q1, then MinHash LSH near duplicates")
    f.add_argument("--lang", choices=["ja"], default=None, help="kana/kanji share per turn, English translation tails")
    f.add_argument("--ask-llm", dest="ask_llm", default=None, metavar="CKPT_OR_URL",
                   help="Ask-LLM scorer: a checkpoint folder or an OpenAI-compatible URL (logprobs)")
    f.add_argument("--threshold", type=float, default=None, help="Ask-LLM: keep scores >= this (default 0.5)")
    f.add_argument("--keep-top", dest="keep_top", type=float, default=None,
                   help="Ask-LLM: keep this fraction of the scored rows, best first")
    for name in ("tp", "pp", "ep"):
        f.add_argument(f"--{name}", type=int, default=1)
    f.add_argument("--nproc", type=int, default=None)
    f.set_defaults(func=cmd_synth_filter)
    m = ssub.add_parser("merge", help="join shard outputs; every id of the recipe exactly once")
    m.add_argument("dirs", nargs="+", help="output folders of the shard runs (or one folder holding all shards)")
    m.add_argument("--out", required=True)
    m.add_argument("--limit", type=int, default=None, help="the --limit the shard runs used (default: the recipe's count)")
    m.set_defaults(func=cmd_synth_merge)
    e = ssub.add_parser("export", help="an output folder as a Hugging Face dataset (load_from_disk) with a dataset card")
    e.add_argument("out_dir", help="a `tanuki synth run` output folder (its filtered/ kept rows when it was filtered)")
    e.add_argument("--to", choices=["hf-dataset"], required=True, help="the format (hf-dataset: datasets.save_to_disk)")
    e.add_argument("dest", help="the dataset folder to write (built beside it, renamed into place when complete)")
    e.add_argument("--include-rejected", action="store_true", help="also the rows `tanuki synth filter` dropped (keep=false)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing DEST")
    e.set_defaults(func=cmd_synth_export)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tanuki", description="Tanuki LLMs on Megatron-Core")
    p.add_argument("--version", action=_Version, nargs=0, help="versions of tanuki and its numerics stack")
    sub = p.add_subparsers(dest="command", required=True)

    mi = sub.add_parser("model-info", help="parameter counts of a preset (built on the meta device)")
    mi.add_argument("preset", nargs="?")
    mi.add_argument("--list", action="store_true", help="every preset: architecture and total parameters")
    mi.add_argument("--json", action="store_true")
    from megatron_tanuki.models.plan import add_plan_arguments

    add_plan_arguments(mi)
    mi.set_defaults(func=cmd_model_info)

    conv = sub.add_parser("convert", help="weights HF <-> megatron-core (streaming, CPU)")
    csub = conv.add_subparsers(dest="direction", required=True)
    h2m = csub.add_parser("hf-to-mcore", help="HF folder -> megatron-core torch_dist checkpoint")
    h2m.add_argument("--hf", required=True)
    h2m.add_argument("--vision", default=None, help="LLaVA-JP: the SigLIP folder, if the tower is not inside --hf")
    m2h = csub.add_parser("mcore-to-hf", help="megatron-core torch_dist checkpoint -> HF folder")
    m2h.add_argument("--ckpt", required=True)
    n2m = csub.add_parser("nemo-to-mcore", help="unpacked .nemo folder (Nemotron-4 release, zarr) -> torch_dist")
    n2m.add_argument("--nemo", required=True, help="the folder with model_config.yaml and model_weights/")
    n2m.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                     help="checkpoint dtype (default: the yaml's precision, bf16 for the release)")
    for sp in (h2m, m2h, n2m):
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
    ver.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                     help="both sides in this dtype (bf16: half the memory; default tolerance 5%% of the "
                          "largest |reference logit|, top-1 agreement reported, not required)")
    ver.add_argument("--layers", type=int, default=None,
                     help="compare only the first N decoder layers (both models built with N layers, only "
                          "their weights loaded; final norm and output layer still apply)")
    ver.add_argument("--memory-budget-gb", type=float, default=None,
                     help="without --layers: compare the most layers whose estimated peak memory fits")
    ver.add_argument("--tolerance", type=float, default=None,
                     help="max |logit diff| allowed (default: 1e-4 in fp32; see --dtype for bf16)")
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

    g = sub.add_parser("generate", help="batched generation (continuous batching) for a JSONL of requests")
    g.add_argument("--ckpt", required=True, help="a megatron_tanuki checkpoint (or a training run's folder)")
    g.add_argument("--input", required=True, help='JSONL: {"id", "prompt" | "messages", ["image"], [sampling]}')
    g.add_argument("--output", required=True, help="JSONL, appended; ids already in it are skipped (resume)")
    for name in ("tp", "pp", "ep"):
        g.add_argument(f"--{name}", type=int, default=1)
    g.add_argument("--nproc", type=int, default=None, help="local ranks (default TP*PP*EP; more = data parallel)")
    g.add_argument("--max-tokens", type=int, default=512)
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0, help="run seed; each request's seed = f(run seed, its id)")
    g.add_argument("--chat", default=None, help="template: tanuki | llava-v1 | nemotron4 | plain | none (raw text); "
                   "default: the architecture's (tanuki, llava-v1 for Tanuki-vision, nemotron4)")
    g.add_argument("--stop", nargs="+", default=None, help="stop strings (cut exactly; not in the text)")
    g.add_argument("--logprobs", action="store_true", help="each generated token's log-probability")
    g.add_argument("--kv-memory-gb", type=float, default=None,
                   help="KV cache size per rank (default: half the free GPU memory; 1 GB on CPU)")
    g.add_argument("--max-seq-len", type=int, default=None, help="prompt + completion (default: the model's)")
    g.add_argument("--max-tokens-per-step", type=int, default=8192, help="tokens per forward (multiple of 64)")
    g.add_argument("--score", default=None, help="comma-separated one-token answers: their probabilities at the "
                   "end of each prompt, no generation (e.g. yes,no)")
    g.add_argument("--prompt-logprobs", action="store_true", help="with --score: each prompt token's log-likelihood")
    g.add_argument("--tokenizer", default=None, help="a .model file or a folder with tokenizer.json "
                   "(default: the shipped Tanuki tokenizer)")
    g.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: the checkpoint's")
    g.add_argument("--fp8", choices=["e4m3", "hybrid"], default=None,
                   help="FP8 weights and GEMMs through Transformer Engine (GPUs only; e.g. Nemotron-4-340B on 8 H100)")
    g.set_defaults(func=cmd_generate)

    rw = sub.add_parser("score-reward", help="score conversations with a reward model (Nemotron-4-340B-Reward)")
    rw.add_argument("--ckpt", required=True)
    rw.add_argument("--input", required=True, help='JSONL: {"id", "messages": [..., the assistant answer last]}')
    rw.add_argument("--output", required=True, help="JSONL of scores (appended; ids already there are skipped)")
    for name in ("tp", "pp"):
        rw.add_argument(f"--{name}", type=int, default=1)
    rw.add_argument("--nproc", type=int, default=None, help="ranks (default TP x PP)")
    rw.add_argument("--batch-size", type=int, default=4, help="conversations per forward pass")
    rw.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the checkpoint's hf/tokenizer.model)")
    rw.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: the checkpoint's")
    rw.set_defaults(func=cmd_score_reward)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat/completions, streaming) on the engine")
    sv.add_argument("--ckpt", required=True, help="a megatron_tanuki checkpoint (or a training run's folder)")
    for name in ("tp", "pp", "ep"):
        sv.add_argument(f"--{name}", type=int, default=1)
    sv.add_argument("--nproc", type=int, default=None, help="local ranks (default TP*PP*EP)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; others need --api-key)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $TANUKI_API_KEY)")
    sv.add_argument("--insecure-no-api-key", action="store_true", help="allow a non-loopback --host without a key")
    sv.add_argument("--served-model-name", default=None, help="the model id clients use (default: the ckpt folder name)")
    sv.add_argument("--max-concurrency", type=int, default=256, help="requests in progress; more get 429")
    sv.add_argument("--max-prompt-tokens", type=int, default=None, help="longer prompts get 400 (default: the context)")
    sv.add_argument("--max-tokens-limit", type=int, default=None, help="ceiling for max_tokens (default: the context)")
    sv.add_argument("--max-seq-len", type=int, default=None, help="prompt + completion (default: the model's)")
    sv.add_argument("--kv-memory-gb", type=float, default=None, help="KV cache per rank (default: half the free GPU memory)")
    sv.add_argument("--max-tokens-per-step", type=int, default=8192, help="tokens per forward (multiple of 64)")
    sv.add_argument("--allow-local-images", default=None, metavar="DIR",
                    help="image_url may be a file path inside DIR (default: data: URLs only)")
    sv.add_argument("--chat", default=None, help="chat template (default: the architecture's -- tanuki, llava-v1 for Tanuki-vision, nemotron4)")
    sv.add_argument("--shutdown-grace", dest="shutdown_grace_s", type=float, default=30.0,
                    help="on SIGTERM, seconds to finish in-flight requests before cancelling them")
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: the checkpoint's")
    sv.add_argument("--fp8", choices=["e4m3", "hybrid"], default=None,
                    help="FP8 weights and GEMMs through Transformer Engine (GPUs only; e.g. Nemotron-4-340B on 8 H100)")
    sv.add_argument("--tokenizer", default=None)
    sv.set_defaults(func=cmd_serve)

    _synth_parser(sub)

    pd = sub.add_parser("preprocess-data", help="JSONL -> megatron-core indexed dataset (.bin/.idx) for pretraining")
    pd.add_argument("--input", action="append", required=True, help="JSONL file or glob (repeat for more)")
    pd.add_argument("--output-prefix", required=True, help="writes PREFIX_{json-key}_document.bin/.idx (Megatron-LM's names)")
    pd.add_argument("--json-key", default="text", help="the field holding each document's text")
    pd.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    pd.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                    help="end every document with the tokenizer's </s> (default on)")
    pd.add_argument("--tokenizer", default=None, help="a SentencePiece .model or a folder with tokenizer.json "
                    "(default: the shipped Tanuki tokenizer)")
    pd.add_argument("--overwrite", action="store_true", help="replace an existing .bin/.idx")
    pd.set_defaults(func=cmd_preprocess_data)

    tr = sub.add_parser("train", help="pretrain / SFT / VLM stage 1-2 from a YAML config (examples/)")
    launch.add_arguments(tr)
    tr.set_defaults(func=launch.command)

    d = sub.add_parser("demo", help="the main job on a small embedded default (CPU, 2 ranks)")
    d.add_argument("--workdir", default="runs/demo", help="data, checkpoints and the export go here")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke run, not a result)")
    d.add_argument("--data-only", action="store_true", help="only write the generated dataset")
    d.add_argument("--llm", action="store_true", help="the earlier text-only MoE demo instead")
    d.add_argument("--steps", type=int, default=60, help="--llm: training steps")
    d.set_defaults(func=cmd_demo, run_dir=None)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        launch.merge_overrides(args, extra, parser.error)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "model-info" and (args.preset is None) == (not args.list):
        parser.error("model-info: give a PRESET or --list")
    if args.command == "demo":
        args.run_dir = args.workdir
    if args.command == "synth" and args.synth_command == "run" and args.backend is None:
        args.backend = "openai" if args.base_urls else "engine"
    crash.exit_on_sigterm()
    try:
        if args.command != "train":  # train activates in each rank (launch.train_rank)
            from megatron_tanuki.runtime import cpu

            cpu.activate()  # the CPU redirects, explicitly, before anything is built or read
        return args.func(args)
    except Exception as e:
        return crash.report(f"tanuki {args.command}", e, getattr(args, "run_dir", None))


if __name__ == "__main__":
    sys.exit(main())
