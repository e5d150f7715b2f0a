"""The engine's greedy tokens are the right tokens (CPU, fp32).

Tiny Tanuki dense and MoE: HF folders (fp32) -> `tanuki convert hf-to-mcore` -> the Engine on a batch
of prompts of different lengths submitted together. Each request's new tokens must equal
transformers ``generate(do_sample=False)`` on the HF folder, and the argmax of megatron-core's
uncached full-recompute logits (``forward_logits``) of the same model after ``engine.close()``.
Tanuki-vision: tiny LLaVA-JP with 4 different images in one batch against the LLaVA-JP forward
assembled from transformers parts (hf_reference.py) in an uncached greedy loop.

Each batch runs twice: with a token budget per forward that prefills every prompt in the first
step, and with megatron-core's smallest budget (64), so prompts -- and images -- are prefilled in
chunks alongside running decodes; the tokens must not change.

Both sides choose from the tokenizer's 65000 rows only (the model has 65024): the engine's
``vocab_limit``, a logits processor on the HF side. Sequences are compared up to and including the
first EOS (the engine drops the EOS it stopped at and says ``finish_reason == "stop"``). Random
weights never pick EOS nor a padded row, so the text models get an EOS output row that wins mid-way
in one request, and a padded row that has the largest logit mid-way in another.
"""
import os
import subprocess
import sys

import pytest
import torch

from tests.convert import tiny_hf, tiny_llava

TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
EOS, PAD = 2, 3
TEXTS = ["猫", "日本の首都はどこですか？", "たぬきは日本の森に住む動物で、夜になると食べ物を探しに出かけます。" * 2,
         "Write a short poem about the sea.", "次の文章を要約してください。" + "今日は晴れです。" * 12]
MAX_NEW = [8, 12, 9, 11, 10]       # different output lengths: requests finish at different steps
VOCAB = 65000                      # the tokenizer's pieces; the model has 65024 rows
EOS_AT = (2, 5)                    # request r2 picks EOS as its 5th new token
PADDED_ROW, PADDED_AT = 65010, (3, 3)  # a padded row has the largest logit at r3's 3rd token
QUESTIONS = ["この画像について説明してください。", "何色ですか？", "画像の左上には何がありますか？詳しく。", "数えて"]
VLM_NEW = 8
ENGINE = dict(max_sequence_length=256, kv_memory_gb=0.02, block_size=64, max_tokens=512)
CHUNKED = 64                       # tokens per forward in the second run (megatron-core's minimum)


def _convert_all(pairs: dict) -> None:
    """`tanuki convert hf-to-mcore` for every (HF folder, output) at once (the CPUs overlap them)."""
    procs = {hf: subprocess.Popen([TANUKI, "convert", "hf-to-mcore", "--hf", hf, "--out", out],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for hf, out in pairs.items()}
    for hf, proc in procs.items():
        text, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{hf}: {text}"


def _upto_eos(tokens):
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def _with_eos(c: dict) -> list[int]:
    """An engine completion's tokens with the EOS it stopped at put back."""
    return c["tokens"] + ([EOS] if c["finish_reason"] == "stop" else [])


# ------------------------------------------------------------------ the rank side (one spawned process)

def _engine_run(chunks, tok, limit: int, requests, engine_kw: dict) -> dict:
    """Submit every request before the first step, step to the end; plain data back."""
    from megatron_tanuki.inference.engine import Engine, EngineOptions, SamplingOptions

    engine = Engine(chunks, tok, EngineOptions(**engine_kw), vocab_limit=limit, log=lambda *_: None)
    engine.tracing = True
    projector_batches, hook = [], None
    if engine.vision is not None:  # every tower + projector run and how many images it took
        hook = engine.vision.vision_projection.register_forward_hook(
            lambda _m, args, _out: projector_batches.append(int(args[0].shape[0])))
    for key, ids, max_new, images in requests:
        engine.submit(key, ids, SamplingOptions(temperature=0, max_tokens=max_new), images=images)
    done = {}
    try:
        while engine.has_work():
            for c in engine.step():
                done[c.key] = {"tokens": c.tokens, "finish_reason": c.finish_reason, "error": c.error,
                               "prompt_tokens": c.prompt_tokens}
    finally:
        engine.close()
        if hook is not None:
            hook.remove()
    return {"done": done, "steps": engine.steps, "trace": engine.trace, "projector_batches": projector_batches,
            "images_encoded": engine.images.images_encoded if engine.images is not None else 0}


def _recompute(chunks, limit: int, eos: int, num_image_tokens: int, requests) -> tuple[dict, int]:
    """Greedy without a KV cache: the whole sequence through forward_logits for every new token.
    Also counts the steps where a padded row (>= ``limit``) had the largest logit."""
    from megatron_tanuki.data.templates import expand_image_tokens
    from megatron_tanuki.inference.logits import forward_logits

    out, padded_wins = {}, 0
    for key, ids, max_new, images in requests:
        seq = expand_image_tokens(ids, None, num_image_tokens)[0] if images else list(ids)
        pixels = torch.stack(images) if images else None
        new = []
        while len(new) < max_new and (not new or new[-1] != eos):
            logits = forward_logits(chunks, torch.tensor([seq]), images=pixels, last_only=True)
            new.append(int(logits[0, :limit].argmax()))
            padded_wins += int(logits[0].argmax()) >= limit
            seq.append(new[-1])
        out[key] = new
    return out, padded_wins


def _run_checkpoint(ckpt: str, requests) -> dict:
    """Load ``ckpt`` as `tanuki generate` does; the engine at two prefill budgets, then recompute."""
    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.inference.generate import GenerateJob, load_model

    cfg, chunks, hf_vocab = load_model(GenerateJob(ckpt=ckpt, input="-", output="-"))
    tok = load_tokenizer()
    limit = min(tok.vocab_size, hf_vocab)
    out = {"vocab_limit": limit, "eos": tok.eos_id,
           "batched": _engine_run(chunks, tok, limit, requests, ENGINE),
           "chunked": _engine_run(chunks, tok, limit, requests, {**ENGINE, "max_tokens": CHUNKED})}
    images = getattr(cfg, "num_image_tokens", 0)
    out["recompute"], out["padded_wins"] = _recompute(chunks, limit, tok.eos_id, images, requests)
    return out


def _run_all(jobs: dict) -> dict:
    """Every checkpoint in one process (one interpreter and megatron-core start-up for all)."""
    return {name: _run_checkpoint(ckpt, requests) for name, (ckpt, requests) in jobs.items()}


# ------------------------------------------------------------------ inputs and the HF side

class _OnlyTokenizerRows:
    """HF logits processor: rows past the tokenizer (the model's padded vocab) are never chosen."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.limit:] = float("-inf")
        return scores


def _hf_generate(model, ids: list[int], n: int, limit: int) -> list[int]:
    from transformers import LogitsProcessorList

    x = torch.tensor([ids])
    with torch.no_grad():
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                           eos_token_id=EOS, pad_token_id=PAD,
                           logits_processor=LogitsProcessorList([_OnlyTokenizerRows(limit)]))
    return y[0, len(ids):].tolist()


def _prompts():
    from megatron_tanuki.data import templates
    from megatron_tanuki.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    prompts = [tok.encode(TEXTS[0], bos=True)]  # a raw 2-token prompt
    return prompts + [templates.prompt_ids(tok, "tanuki", [("user", t)]) for t in TEXTS[1:]]


def _make_row_win(model, row: int, prompt: list[int], n: int, limit: int) -> None:
    """Output row ``row`` becomes 1.05 x (0.95 x for a negative logit) the row of the token greedy
    picks as the ``n``-th new token of ``prompt``, so ``row`` beats it there by a wide margin."""
    token = _hf_generate(model, prompt, n, limit)[-1]
    with torch.no_grad():
        seq = torch.tensor([prompt + _hf_generate(model, prompt, n - 1, limit)])
        logit = float(model(seq).logits[0, -1, token])
        head = model.get_output_embeddings().weight
        head[row] = head[token] * (1.05 if logit > 0 else 0.95)


def _images(size: int):
    """4 different pictures: the sample image, mirrored, colour-inverted, and seeded noise."""
    import numpy as np
    from PIL import Image, ImageOps

    from megatron_tanuki.data.images import sample_image

    base = sample_image(size)
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return [base, ImageOps.mirror(base), ImageOps.invert(base), Image.fromarray(noise, "RGB")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fp32 HF folders (dense, MoE, LLaVA-JP) -> `tanuki convert hf-to-mcore` -> the engine and the
    full-recompute greedy of each, all in one spawned rank."""
    from megatron_tanuki.convert.sources import open_source
    from megatron_tanuki.data import templates
    from megatron_tanuki.data.images import preprocess
    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.runtime.spawn import run_ranks

    base = tmp_path_factory.mktemp("generate")
    out, jobs = {}, {}
    prompts = _prompts()
    for kind, model in (("dense", tiny_hf.dense_model()), ("moe", tiny_hf.moe_model())):
        _make_row_win(model, EOS, prompts[EOS_AT[0]], EOS_AT[1], VOCAB)
        _make_row_win(model, PADDED_ROW, prompts[PADDED_AT[0]], PADDED_AT[1], VOCAB)
        hf = tiny_hf.save(model, str(base / kind / "hf"), dtype=torch.float32)
        requests = [(f"r{i}", ids, n, None) for i, (ids, n) in enumerate(zip(prompts, MAX_NEW))]
        jobs[kind] = (str(base / kind / "mcore"), requests)
        out[kind] = {"hf": hf, "prompts": prompts}

    paths = tiny_llava.build(str(base / "vlm"), moe=False, dtype=torch.float32)
    cfg, _ = open_source(paths["llava"])
    tok = load_tokenizer()
    vlm_prompts = [templates.prompt_ids(tok, "llava-v1", [("user", "<image>\n" + q)]) for q in QUESTIONS]
    pixels = [preprocess(img, cfg.image_size) for img in _images(cfg.image_size)]
    requests = [(f"img{i}", ids, VLM_NEW, [px]) for i, (ids, px) in enumerate(zip(vlm_prompts, pixels))]
    jobs["vlm"] = (str(base / "vlm" / "mcore"), requests)
    out["vlm"] = {"paths": paths, "requests": requests, "hf": paths["llava"]}
    _convert_all({out[kind]["hf"]: ckpt for kind, (ckpt, _) in jobs.items()})

    for kind, got in run_ranks(_run_all, 1, jobs)[0].items():
        out[kind]["got"] = got
    return out


def _check_batching(got: dict, keys: list[str], prompt_tokens: int) -> None:
    """The batched run prefilled every request in step 1 and took one step per token of the longest
    answer; the chunked run could not (its budget is smaller than the prompts)."""
    batched, chunked = got["batched"], got["chunked"]
    assert prompt_tokens <= ENGINE["max_tokens"] and prompt_tokens > 2 * CHUNKED
    assert batched["trace"][0] == (1, sorted(keys))
    longest = max(len(_with_eos(c)) for c in batched["done"].values())
    assert batched["steps"] == longest
    assert len(chunked["trace"][0][1]) < len(keys) and chunked["steps"] > longest
    for key in keys:  # chunked prefill changes the schedule, never the tokens
        assert chunked["done"][key] == batched["done"][key], key


# ------------------------------------------------------------------ the tests

@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_equals_transformers_generate_and_full_recompute(runs, kind):
    got, prompts, hf = runs[kind]["got"], runs[kind]["prompts"], runs[kind]["hf"]
    assert got["vocab_limit"] == VOCAB and got["eos"] == EOS
    assert got["padded_wins"] >= 1  # unmasked, a padded row would have been picked
    assert len({len(p) for p in prompts}) == len(prompts)  # all lengths differ
    assert max(len(p) for p in prompts) > ENGINE["block_size"]  # a prompt spans several KV blocks
    if kind == "moe":
        from megatron_tanuki.models.tanuki.hf import load_remote_code_classes

        model_cls = load_remote_code_classes()[1]
    else:
        from transformers import LlamaForCausalLM as model_cls
    model = model_cls.from_pretrained(hf, dtype=torch.float32).eval()
    assert next(model.parameters()).dtype == torch.float32
    reasons = []
    for i, (ids, n) in enumerate(zip(prompts, MAX_NEW)):
        ref = _hf_generate(model, ids, n, got["vocab_limit"])
        c = got["batched"]["done"][f"r{i}"]
        assert c["error"] is None and c["prompt_tokens"] == len(ids)
        assert c["finish_reason"] == ("stop" if EOS in ref else "length"), (i, c, ref)
        assert _with_eos(c) == _upto_eos(ref), (kind, i, _with_eos(c), ref)
        assert _with_eos(c) == got["recompute"][f"r{i}"], (kind, i)
        assert len(_with_eos(c)) == n or _with_eos(c)[-1] == EOS
        reasons.append(c["finish_reason"])
    assert reasons[EOS_AT[0]] == "stop" and len(got["batched"]["done"][f"r{EOS_AT[0]}"]["tokens"]) < EOS_AT[1]
    assert "length" in reasons
    _check_batching(got, [f"r{i}" for i in range(len(prompts))], sum(map(len, prompts)))


def test_vision_greedy_equals_llava_jp_reference_for_4_images_in_one_batch(runs):
    from megatron_tanuki.convert.sources import open_source
    from megatron_tanuki.data.templates import IMAGE_TOKEN_ID
    from megatron_tanuki.models.tanuki_vision.hf_reference import LlavaJpReference

    got, requests = runs["vlm"]["got"], runs["vlm"]["requests"]
    cfg, src = open_source(runs["vlm"]["paths"]["llava"])
    ref_model = LlavaJpReference.from_source(cfg, src).float().eval()
    limit = got["vocab_limit"]
    answers = set()
    for key, ids, n, (px,) in requests:
        assert ids.count(IMAGE_TOKEN_ID) == 1
        seq, ref = list(ids), []
        with torch.no_grad():
            feats = LlavaJpReference.image_features(ref_model, px[None])
            # the uncached loop re-runs the whole sequence; only this image's features are kept
            ref_model.image_features = lambda images, feats=feats: feats
            while len(ref) < n and (not ref or ref[-1] != EOS):
                ref.append(int(ref_model(seq, px[None])[0, -1, :limit].argmax()))
                seq.append(ref[-1])
        c = got["batched"]["done"][key]
        assert c["error"] is None and c["prompt_tokens"] == len(ids) - 1 + cfg.num_image_tokens
        assert _with_eos(c) == ref, (key, _with_eos(c), ref)
        assert _with_eos(c) == got["recompute"][key], key
        answers.add(tuple(ref))
    assert len(answers) == 4  # four different answers, not one repeated
    # the 4 images were encoded once each, in one tower + projector run in the first (prefill) step
    batched = got["batched"]
    assert batched["images_encoded"] == 4 and batched["projector_batches"] == [4]
    _check_batching(got, [f"img{i}" for i in range(4)], sum(len(ids) - 1 + cfg.num_image_tokens
                                                           for _, ids, _, _ in requests))
    # chunked: still each image once, in the step that reaches its positions
    assert got["chunked"]["images_encoded"] == 4 and sum(got["chunked"]["projector_batches"]) == 4
