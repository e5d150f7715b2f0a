"""`make demo`: a tiny Tanuki-vision learns to describe generated pictures, on 2 CPU ranks (EP=2).

The real recipe, shrunk: (0) the language model -- a tiny Tanuki-8x8B-shaped MoE with the real
tokenizer -- pretrains on the demo's Japanese text; the tiny SigLIP-shaped tower is trained briefly
on the images (no pretrained SigLIP can be downloaded here); (1) stage 1 trains the projector only
on `plain` captions; (2) stage 2 trains projector + language model on `v1` Q&A. The tower stays
frozen in both stages. Each stage is `tanuki train examples/tiny_vlm_*.yaml`. Then held-out images
are described before and after, the colour, shape and position words are scored against the
truth, the checkpoint is exported to the LLaVA-JP layout.
"""
from __future__ import annotations

import json
import os
import shutil
import time

from megatron_tanuki.demo import shapes

PRESET = "tanuki-vision-8x8b-tiny"
CHANCE = {"color": 1 / len(shapes.COLORS), "shape": 1 / len(shapes.SHAPES), "position": 1 / len(shapes.POSITIONS)}


def examples_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.normpath(os.path.join(here, "..", "..", "examples"))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: the demo's configs live in the repository's examples/ "
                                "(run `make demo` from a checkout)")
    return path


def describe_rank(ckpt: str, heldout: list[dict], image_folder: str, layout: dict, max_new_tokens: int = 16) -> list[str]:
    """Rank side: greedy captions for held-out images (v1 prompt, DESCRIBE question), all images in
    flight at once on the inference engine (continuous batching, paged KV cache)."""
    from megatron_tanuki.data.images import load_image, preprocess
    from megatron_tanuki.data.templates import prompt_ids
    from megatron_tanuki.data.tokenizer import TanukiTokenizer
    from megatron_tanuki.inference.engine import Engine, EngineOptions, SamplingOptions
    from megatron_tanuki.models.registry import get_preset
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.models.tanuki_vision.builder import build_vlm
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed
    from megatron_tanuki.train import checkpoint as ckpt_io

    cfg = get_preset(PRESET)
    layout = ParallelLayout(**layout)
    init_distributed(layout, cfg.llm)
    chunks = build_vlm(cfg, layout, BuildOptions(dtype="fp32"))
    ckpt_io.load_weights(ckpt_io.resolve(ckpt), chunks)
    tok = TanukiTokenizer()
    # The same ids training fed for this conversation, up to the answer (data/templates.py).
    prompt = prompt_ids(tok, "llava-v1", [("user", f"<image>\n{shapes.DESCRIBE}")])
    engine = Engine(chunks, tok, EngineOptions(max_sequence_length=cfg.llm.max_position_embeddings,
                                               kv_memory_gb=0.05, max_tokens=2048, block_size=64),
                    log=lambda *_: None)
    greedy = SamplingOptions(temperature=0, max_tokens=max_new_tokens)
    requests = [(str(i), prompt, greedy, [preprocess(load_image(os.path.join(image_folder, h["image"]), h["image"]),
                                                     cfg.image_size)])
                for i, h in enumerate(heldout)]
    done = {c.key: c for c in engine.run(requests)}
    engine.close()
    failed = [c.error for c in done.values() if c.error]
    if failed:
        raise RuntimeError(f"describe: {len(failed)} request(s) failed, first: {failed[0]}")
    return [done[str(i)].text for i in range(len(heldout))]


def _accuracy(captions: list[str], heldout: list[dict]) -> dict:
    scores = [shapes.score(c, h) for c, h in zip(captions, heldout)]
    return {k: sum(s[k] for s in scores) / len(scores) for k in CHANCE}


def _train(config: str, overrides: list[str], nproc: int) -> dict:
    from megatron_tanuki.runtime.spawn import run_ranks
    from megatron_tanuki.train.launch import train_rank

    result = run_ranks(train_rank, nproc, config, overrides)[0]
    if "error" in result:
        raise RuntimeError(f"tanuki train {os.path.basename(config)}: {result['error']}")
    return result


def main(workdir: str = "runs/demo", seed: int = 0, n_train: int = 3000, n_heldout: int = 90,
         world_size: int = 2, quick: bool = False) -> dict:
    from megatron_tanuki.demo.tower import pretrain_and_assemble
    from megatron_tanuki.runtime.spawn import run_ranks

    say = lambda *a: print(*a, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    ex = examples_dir()
    if quick:
        n_train, n_heldout = 200, 12
    data = shapes.generate(os.path.join(workdir, "data"), n_train, n_heldout, seed=seed, log=say)
    for stage in ("stage0", "init", "stage1", "stage2", "hf", "tensorboard"):
        shutil.rmtree(os.path.join(workdir, stage), ignore_errors=True)
    paths = [f"data.train=[{data['text']}]"]
    short = ["train.train_steps=4"] if quick else []
    common = [f"parallel.ep={world_size}"]

    say("[demo] step 1/5: the language model pretrains on the demo's Japanese text (pretraining mode)")
    _train(os.path.join(ex, "tiny_vlm_stage0_text.yaml"),
           paths + common + short + [f"checkpoint.dir={workdir}/stage0"], world_size)

    say("[demo] step 2/5: the tiny SigLIP-shaped tower trains briefly on the images (stand-in for a "
        "pretrained SigLIP; frozen from here on)")
    tower = run_ranks(pretrain_and_assemble, 1, PRESET, f"{workdir}/stage0", data["stage1"], data["images"],
                      f"{workdir}/init", 20 if quick else 700, env={"OMP_NUM_THREADS": str(world_size)})[0]
    acc = tower["val_accuracy"]
    say(f"[demo] tower probe accuracy on its held-out tenth: colour {acc['color']:.0%}, shape {acc['shape']:.0%}, "
        f"position {acc['position']:.0%}")

    with open(data["heldout"], encoding="utf-8") as f:
        heldout = [json.loads(line) for line in f]
    layout = {"ep": world_size}
    before = run_ranks(describe_rank, world_size, f"{workdir}/init", heldout, data["images"], layout)[0]

    say("[demo] step 3/5: stage 1 -- projector only, `plain` captions")
    vlm_paths = [f"data.image_folder={data['images']}"]
    _train(os.path.join(ex, "tiny_vlm_stage1.yaml"),
           [f"data.train=[{data['stage1']}]", f"model.init_checkpoint={workdir}/init",
            f"checkpoint.dir={workdir}/stage1"] + vlm_paths + common + short, world_size)
    say("[demo] step 4/5: stage 2 -- projector + language model, `v1` Q&A")
    s2 = _train(os.path.join(ex, "tiny_vlm_stage2.yaml"),
                [f"data.train=[{data['stage2']}]", f"model.init_checkpoint={workdir}/stage1",
                 f"checkpoint.dir={workdir}/stage2", f"log.tensorboard_dir={workdir}/tensorboard"]
                + vlm_paths + common + short, world_size)
    after = run_ranks(describe_rank, world_size, f"{workdir}/stage2", heldout, data["images"], layout)[0]

    say(f"[demo] step 5/5: {len(heldout)} held-out images, prompt 「{shapes.DESCRIBE}」")
    for h, b, a in list(zip(heldout, before, after))[:6]:
        say(f"  {h['image']}  truth 「{h['caption']}」\n      before 「{b}」\n      after  「{a}」")
    acc_before, acc_after = _accuracy(before, heldout), _accuracy(after, heldout)
    ok = all(acc_after[k] >= 3 * CHANCE[k] for k in CHANCE)
    for k in CHANCE:
        say(f"[demo] {k:8s} accuracy: before {acc_before[k]:6.1%}  after {acc_after[k]:6.1%}  "
            f"(chance {CHANCE[k]:.1%}, 3x chance {3 * CHANCE[k]:.1%})")

    from megatron_tanuki.convert import engine

    engine.mcore_to_hf(s2["checkpoint"], f"{workdir}/hf", overwrite=True)
    say(f"[demo] exported {s2['checkpoint']} -> {workdir}/hf (LLaVA-JP layout: model.*, lm_head, "
        f"model.mm_projector.*, model.vision_tower.vision_tower.*)")
    verdict = "PASS: every accuracy >= 3x chance" if ok else "BELOW 3x chance"
    say(f"[demo] done in {time.perf_counter() - t0:.0f} s: {verdict}")
    return {"before": acc_before, "after": acc_after, "ok": ok, "tower": acc, "captions": after}
