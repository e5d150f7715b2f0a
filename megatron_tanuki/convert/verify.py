"""`tanuki convert verify`: the converted checkpoint, under a parallel layout, against transformers.

The HF side is built with transformers' own classes (LlamaForCausalLM, or our TanukiForCausalLM
for the MoE -- never code from the checkpoint folder; for Tanuki-vision the LLaVA-JP forward
assembled from SiglipVisionModel + projector + that LLM, models/tanuki_vision/hf_reference.py);
the Megatron side loads the torch_dist checkpoint into the requested TP/PP/EP layout over that
many processes (gloo on CPU). Both run on the same tokens (and image); we report the max absolute
logit difference and top-1 agreement.

Fitting a convert node (a 64-GB CPU node cannot hold Tanuki-8x8B in fp32, ~190 GB):
- ``dtype="bf16"``: both sides in bf16. The logits then differ by bf16 rounding, so the default
  tolerance is relative: 5% of the largest |reference logit|; top-1 agreement is reported, not
  required (a position can only flip where the reference's top two logits are closer than twice
  the tolerance). In fp32 the default is an absolute 1e-4 and every top-1 must agree.
- ``layers=N``: both models are built with the first N decoder layers only and load only those
  layers' weights (the final norm and output layer still apply); the vision tower stays whole.
- ``memory_budget_gb``: without ``layers``, the most layers whose estimated peak fits the budget.

Inputs: the checkpoint's own tokenizer (tokenizer.model or tokenizer.json in the HF folder, else in
the converted checkpoint's hf/ side folder) on the text; without one, seeded random ids inside the
vocabulary (or the shipped Tanuki tokenizer when a --text is given). Ids outside the checkpoint's
vocabulary are a VerifyError naming the tokenizer, never an IndexError in the embedding.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

import torch

from megatron_tanuki.convert.engine import HF_SIDE_DIR, byte_progress
from megatron_tanuki.models.checkpoint_meta import read_meta
from megatron_tanuki.models import registry

DEFAULT_TEXT = "たぬきは日本の森に住む動物で、夜になると食べ物を探しに出かけます。"
DEFAULT_VLM_TEXT = "<image>\nこの画像について説明してください。赤い円があります。"
RANDOM_TOKENS, RANDOM_SEED = 32, 0
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
FP32_TOLERANCE, BF16_RELATIVE_TOLERANCE = 1e-4, 0.05
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")  # the language model's layers (not the tower's)
_MCORE_LAYER_KEY = re.compile(r"(?:language_model\.)?decoder\.layers\.")  # the LLM's stacked layer keys
_PROCESS_GB = 1.5  # one python + torch + megatron-core process, before any weights


class VerifyError(ValueError):
    """Verify cannot run as asked (inputs outside the vocabulary, a layer count, a memory budget)."""


def _say(msg: str) -> None:
    print(f"verify: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs

def find_tokenizer(folders) -> str | None:
    """The first tokenizer.model / tokenizer.json in ``folders`` (the HF folder, then ckpt/hf)."""
    for folder in folders:
        for name in TOKENIZER_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def _random_ids(vocab: int, vlm: bool) -> list[int]:
    from megatron_tanuki.data.templates import IMAGE_TOKEN_ID

    g = torch.Generator().manual_seed(RANDOM_SEED)
    ids = torch.randint(0, vocab, (RANDOM_TOKENS,), generator=g).tolist()
    return ids[:1] + [IMAGE_TOKEN_ID] + ids[1:] if vlm else ids


def verify_inputs(folders, text: str | None, vocab: int, vlm: bool, where_vocab: str) -> tuple[list[int], str]:
    """(token ids, with the unexpanded image placeholder for a VLM; how they were made)."""
    from megatron_tanuki.data.templates import IMAGE_MARK, IMAGE_TOKEN_ID, tokenize_with_image
    from megatron_tanuki.data.tokenizer import DEFAULT_MODEL, load_tokenizer

    path = find_tokenizer(folders)
    looked = " or ".join(folders)
    if path is None and text is None:
        return _random_ids(vocab, vlm), (f"{RANDOM_TOKENS} random ids (seed {RANDOM_SEED}) below {vocab}: "
                                         f"no {' / '.join(TOKENIZER_FILES)} in {looked}")
    if path is None:
        path, who = DEFAULT_MODEL, f"the shipped Tanuki tokenizer {DEFAULT_MODEL} (no tokenizer in {looked})"
    else:
        who = path
    what = "--text" if text is not None else "the default text"
    how = f"{what}, tokenized with {who}"
    words = text if text is not None else (DEFAULT_VLM_TEXT if vlm else DEFAULT_TEXT)
    if vlm and words.count(IMAGE_MARK) != 1:
        raise VerifyError(f"verify --text needs exactly one {IMAGE_MARK} for its one image, "
                          f"found {words.count(IMAGE_MARK)}")
    try:
        tok = load_tokenizer(os.path.dirname(path) if path.endswith(".json") else path)
        ids = tokenize_with_image(tok, words, bos=True) if vlm else tok.encode(words, bos=True)
    except KeyError as e:  # a tokenizer without the <s> / </s> our encoders use
        if text is None:
            return _random_ids(vocab, vlm), f"{RANDOM_TOKENS} random ids (seed {RANDOM_SEED}): {e.args[0]}"
        raise VerifyError(f"verify --text: cannot tokenize with {path}: {e.args[0]}") from None
    bad = [i for i in ids if i != IMAGE_TOKEN_ID and not 0 <= i < vocab]
    if bad:
        raise VerifyError(f"verify: {how}, gives token id {bad[0]} ({len(bad)} of {len(ids)} ids), outside "
                          f"the checkpoint's vocabulary of {vocab} ({where_vocab}); give a --text this "
                          f"vocabulary covers, or put the checkpoint's tokenizer in its folder")
    return ids, how


# ---------------------------------------------------------------- the first N layers

def first_layers(cfg, n: int | None):
    """``cfg`` with the language model cut to its first ``n`` decoder layers (None: unchanged)."""
    if n is None:
        return cfg
    arch = registry.architecture_of(cfg)
    llm = arch.language_model(cfg)
    if not 1 <= n <= llm.num_layers:
        raise VerifyError(f"verify --layers {n}: the checkpoint has {llm.num_layers} layers")
    return arch.with_language_model(cfg, dataclasses.replace(llm, num_layers=n))


class _FirstLayers:
    """A HF source seen with its first ``n`` language-model layers only (names and config.json)."""

    def __init__(self, src, n: int | None, bar=None):
        self.src, self.n, self.bar = src, n, bar
        self.path = src.path
        self.config = {**src.config, "num_hidden_layers": n} if n else src.config

    def names(self):
        return [x for x in self.src.names() if not self.n or not (m := _HF_LAYER.match(x)) or int(m.group(1)) < self.n]

    def get(self, name):
        t = self.src.get(name)
        if self.bar is not None:
            self.bar.update(self.src.nbytes(name))
        return t


def memory_estimate(shapes: dict, cfg, dtype: torch.dtype, layers: int, ep: int, world: int) -> float:
    """Peak resident GB of verify: max(HF reference, all megatron ranks) + the processes themselves.

    ``shapes``: the HF tensors' shapes (from the folder's headers): the non-layer tensors, plus
    ``layers`` average layers; on the megatron side, non-expert tensors are repeated on every EP
    rank. The Tanuki-vision reference is assembled in fp32 from an fp32 state dict (two copies),
    whatever ``dtype``.
    """
    llm_layers = registry.language_model(cfg).num_layers
    base = layer_dense = layer_expert = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if not _HF_LAYER.match(name):
            base += numel
        elif ".experts." in name:
            layer_expert += numel
        else:
            layer_dense += numel
    per = torch.empty((), dtype=dtype).element_size()
    vlm = registry.architecture_of(cfg) is registry.TANUKI_VISION
    hf = (base + layers * (layer_dense + layer_expert) / llm_layers) * (8 if vlm else per)
    mc = (base + layers * (layer_dense * ep + layer_expert) / llm_layers) * per
    return (1.1 * max(hf, mc)) / 1e9 + _PROCESS_GB * (world + 1)


def layers_for_budget(shapes: dict, cfg, dtype, budget_gb: float, pp: int, ep: int, world: int) -> int:
    """The most layers (a multiple of PP) whose estimated peak fits ``budget_gb``."""
    total = registry.language_model(cfg).num_layers
    fits = [n for n in range(pp, total + 1, pp) if memory_estimate(shapes, cfg, dtype, n, ep, world) <= budget_gb]
    if not fits:
        need = memory_estimate(shapes, cfg, dtype, pp, ep, world)
        raise VerifyError(f"verify: even {pp} layer(s) need about {need:.1f} GB in {dtype_name(dtype)}, over the "
                          f"memory budget of {budget_gb:.1f} GB")
    return fits[-1]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


# ---------------------------------------------------------------- the two sides

def hf_reference_logits(hf_dir: str, ids: torch.Tensor, dtype: torch.dtype = torch.float32,
                        layers: int | None = None) -> torch.Tensor:
    """transformers' model of ``hf_dir`` (its first ``layers`` layers) on ``ids`` -> float32 logits."""
    from transformers.utils import logging as hf_logging

    from megatron_tanuki.convert.safetensors_io import HFCheckpoint
    from megatron_tanuki.models.tanuki import hf_map
    from megatron_tanuki.models import registry

    src = HFCheckpoint(hf_dir)
    cfg = registry.from_hf_config(src.config, os.path.join(src.path, "config.json"))
    model_cls = registry.architecture_of(cfg).hf_model_class(cfg)
    extra = {"num_hidden_layers": layers} if layers else {}
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists every layer we left out on purpose
    try:
        model, info = model_cls.from_pretrained(hf_dir, dtype=dtype, output_loading_info=True, **extra)
    finally:
        hf_logging.set_verbosity(level)
    skipped = [re.compile(p) for p in hf_map.IGNORED_HF]  # tensors conversion skips too (rotary buffers)
    unexpected = [k for k in info["unexpected_keys"] if not any(p.fullmatch(k) for p in skipped)
                  and not (layers and (m := _HF_LAYER.match(k)) and int(m.group(1)) >= layers)]
    bad = {"missing": sorted(info["missing_keys"]), "unexpected": sorted(unexpected),
           "mismatched": sorted(str(k) for k in info["mismatched_keys"])}
    if any(bad.values()):
        raise VerifyError(f"{hf_dir}: the weights do not fit {model_cls.__name__}: "
                          + "; ".join(f"{k} {v[:3]}" for k, v in bad.items() if v))
    with torch.no_grad():
        return model.eval()(ids).logits.float()


def _vlm_reference_logits(src, cfg, raw_ids, images, dtype, layers) -> torch.Tensor:
    """``src``: the opened LLaVA-JP source (convert/sources.py), tower folder included."""
    from megatron_tanuki.models.tanuki_vision.hf_reference import LlavaJpReference

    view = _FirstLayers(src, layers)
    total = sum(src.nbytes(n) for n in view.names())
    with byte_progress(total, "verify: reading the HF weights") as bar:
        view.bar = bar
        ref = LlavaJpReference.from_source(first_layers(cfg, layers), view).to(dtype)
    with torch.no_grad():
        return ref(raw_ids, images.to(dtype)).float()


def _key_groups(sharded: dict) -> list[dict]:
    """The sharded state dict split by checkpoint key (a stacked tensor: all its layers and experts
    on this rank together, as megatron-core expects), so progress can be shown between them."""
    groups: dict[str, dict] = {}
    for chunk, sd in sharded.items():
        for name, value in sd.items():
            groups.setdefault(getattr(value, "key", name), {}).setdefault(chunk, {})[name] = value
    return list(groups.values())


def _nbytes(sd: dict) -> int:
    return sum(v.data.numel() * v.data.element_size() for d in sd.values() for v in d.values()
               if getattr(v, "data", None) is not None and isinstance(v.data, torch.Tensor))


def _allow_first_layers(sd: dict, stored_layers: int) -> None:
    """Make the decoder-layer entries of a model with fewer layers read the first layers of the stored
    stack: tensors get megatron-core's ``allow_shape_mismatch`` (it reads the overlapping region, i.e.
    exactly those layers); objects (``_extra_state``, keyed by their global shape) the stored layer count."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    def mark(x):
        if isinstance(x, ShardedTensor):
            if _MCORE_LAYER_KEY.match(x.key):
                x.allow_shape_mismatch = True
        elif isinstance(x, ShardedObject):
            if _MCORE_LAYER_KEY.match(x.key):  # the layer axis is prepended first
                x.global_shape = (stored_layers,) + tuple(x.global_shape[1:])
        elif isinstance(x, ShardedTensorFactory):
            build = x.build_fn

            def build_marked(*a, _build=build, **k):
                out = _build(*a, **k)
                mark(out)
                return out

            x.build_fn = build_marked
        elif isinstance(x, dict):
            for v in x.values():
                mark(v)
        elif isinstance(x, list):
            for v in x:
                mark(v)

    mark(sd)


def load_checkpoint(chunks, ckpt: str, stored_layers: int | None = None, progress: bool = False) -> None:
    """Load a torch_dist checkpoint into ``chunks`` one checkpoint key at a time, with a progress bar
    of this rank's bytes when ``progress``. ``stored_layers``: the checkpoint's layer count when the
    model has fewer (it takes the first ones)."""
    from megatron.core import dist_checkpointing

    sharded = {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    if stored_layers is not None:
        _allow_first_layers(sharded, stored_layers)
    groups = _key_groups(sharded)
    sizes = [_nbytes(g) for g in groups]  # before loading: load() replaces factories in place
    loaded = {k: {} for k in sharded}
    bar = byte_progress(sum(sizes), "verify: loading rank 0's share of the checkpoint")
    bar.disable = bar.disable or not progress
    with bar:
        for g, size in zip(groups, sizes):
            # Ranks load different keys (pipeline stages), so no collective may run per group: the
            # whole-tensor coverage check (a collective) is off; the strict load_state_dict below
            # checks that every parameter came.
            state = dist_checkpointing.load(g, ckpt, validate_access_integrity=False)
            for k in g:  # (a training checkpoint's common state comes back too: not ours)
                loaded[k].update(state[k])
            bar.update(size)
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded[f"chunk{i}"], strict=True)
        c.eval()


def _rank_logits(ckpt: str, layout: dict, ids: torch.Tensor, images: torch.Tensor | None = None,
                 dtype: str = "fp32", layers: int | None = None):
    """Rank side: build the (first ``layers`` of the) model in the layout, load, return full logits on one rank."""
    from megatron.core import parallel_state

    from megatron_tanuki.inference.logits import forward_logits
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed

    full, _, hf_vocab = read_meta(ckpt)
    cfg = first_layers(full, layers)
    par = ParallelLayout(**layout)
    env = init_distributed(par, registry.language_model(cfg))
    if dtype == "fp32" and torch.cuda.is_available():  # fp32 parity: no TF32 GEMMs or convolutions
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if env.rank == 0:
        _say(f"building the megatron-core model ({par.describe()}, {dtype}) on {env.world_size} rank(s)")
    chunks = registry.build(cfg, par, BuildOptions(dtype=dtype, perform_initialization=False))
    t0 = time.perf_counter()
    load_checkpoint(chunks, ckpt, stored_layers=registry.language_model(full).num_layers if layers else None,
                    progress=env.rank == 0)
    if env.rank == 0:
        _say(f"checkpoint loaded in {time.perf_counter() - t0:.1f} s; forward")
    logits = forward_logits(chunks, ids, images=images)
    first_of_group = parallel_state.get_tensor_model_parallel_rank() == 0 and \
        parallel_state.get_data_parallel_rank() == 0
    return logits[..., :hf_vocab] if logits is not None and first_of_group else None


# ---------------------------------------------------------------- verify

def verify(hf_dir: str, ckpt: str, tp: int = 1, pp: int = 1, ep: int = 1, text: str | None = None,
           tolerance: float | None = None, image: str | None = None, vision_dir: str | None = None,
           dtype: str = "fp32", layers: int | None = None, memory_budget_gb: float | None = None) -> dict:
    """Logits of ``ckpt`` under TP/PP/EP against transformers on ``hf_dir``; the result says what was
    compared (dtype, layers, inputs), the max |logit diff|, top-1 agreement and ``ok``."""
    from megatron_tanuki.convert.sources import open_source
    from megatron_tanuki.data.templates import expand_image_tokens
    from megatron_tanuki.runtime.distributed import ParallelLayout
    from megatron_tanuki.runtime.spawn import run_ranks

    if dtype not in _DTYPES:
        raise VerifyError(f"verify --dtype {dtype!r}: one of {', '.join(_DTYPES)}")
    torch_dtype = _DTYPES[dtype]
    cfg, _, hf_vocab = read_meta(ckpt)
    if getattr(cfg, "reward_outputs", 0):
        raise VerifyError(f"{ckpt}: {cfg.name} is a reward model; verify compares language-model logits "
                          f"(transformers has no Nemotron reward class)")
    vlm = registry.architecture_of(cfg) is registry.TANUKI_VISION
    llm = registry.language_model(cfg)
    layout = {"tp": tp, "pp": pp, "ep": ep, "sp": tp > 1 and cfg.is_moe}  # MoE with TP needs SP
    world = tp * pp * ep
    _, src = open_source(hf_dir, vision_dir)
    shapes = {name: src.shape(name) for name in src.names()}
    if layers is None and memory_budget_gb is not None:
        layers = layers_for_budget(shapes, cfg, torch_dtype, memory_budget_gb, pp, ep, world)
        if layers == llm.num_layers:
            layers = None
        else:
            full = memory_estimate(shapes, cfg, torch_dtype, llm.num_layers, ep, world)
            _say(f"the whole model needs about {full:.0f} GB in {dtype}, over the memory budget of "
                 f"{memory_budget_gb:.0f} GB: comparing the first {layers} of {llm.num_layers} layers")
    n = layers or llm.num_layers
    ParallelLayout(**layout).validate(world, first_layers(llm, layers))  # before any process starts
    need = memory_estimate(shapes, cfg, torch_dtype, n, ep, world)

    folders = [hf_dir, os.path.join(ckpt, HF_SIDE_DIR)]
    raw_ids, how = verify_inputs(folders, text, hf_vocab, vlm, f"vocab_size in {os.path.join(hf_dir, 'config.json')}")
    _say(f"inputs: {how}")
    images = None
    _say(f"transformers reference from {hf_dir}: {n} of {llm.num_layers} layers in {dtype} "
         f"(peak memory of verify about {need:.1f} GB)")
    t0 = time.perf_counter()
    if vlm:
        from megatron_tanuki.data.images import load_image, preprocess, sample_image

        pil = load_image(image, "verify --image") if image else sample_image(cfg.image_size)
        images = preprocess(pil, cfg.image_size).unsqueeze(0).to(torch_dtype)
        ref = _vlm_reference_logits(src, cfg, raw_ids, images, torch_dtype, layers)
        ids = torch.tensor([expand_image_tokens(raw_ids, None, cfg.num_image_tokens)[0]])
    else:
        ids = torch.tensor([raw_ids])
        ref = hf_reference_logits(hf_dir, ids, torch_dtype, layers)
    _say(f"reference logits in {time.perf_counter() - t0:.1f} s")
    if layout["sp"] and ids.shape[1] % tp:  # sequence parallel splits the sequence: pad (causal: no effect)
        ids = torch.cat([ids, ids[:, -1:].expand(1, tp - ids.shape[1] % tp)], dim=1)
    got = next(r for r in run_ranks(_rank_logits, world, ckpt, layout, ids, images, dtype=dtype, layers=layers)
               if r is not None)
    got = got[:, :ref.shape[1]]
    diff = (got - ref).abs().max().item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    if tolerance is None:
        tolerance = FP32_TOLERANCE if dtype == "fp32" else BF16_RELATIVE_TOLERANCE * ref.abs().max().item()
    ok = diff <= tolerance and (top1 == 1.0 or dtype != "fp32")
    return {"hf": os.path.abspath(hf_dir), "ckpt": os.path.abspath(ckpt), "layout": layout,
            "world_size": world, "dtype": dtype, "layers": n, "total_layers": llm.num_layers,
            "inputs": how, "tokens": ref.shape[1], "images": 0 if images is None else images.shape[0],
            "max_abs_diff": diff, "top1_agreement": top1, "tolerance": tolerance,
            "memory_estimate_gb": round(need, 2), "ok": ok}


def format_result(r: dict) -> str:
    lay = " ".join(f"{k.upper()}={v}" for k, v in r["layout"].items() if k != "sp") + (" SP" if r["layout"]["sp"] else "")
    part = "" if r["layers"] == r["total_layers"] else f", first {r['layers']} of {r['total_layers']} layers"
    return (f"verify {'OK' if r['ok'] else 'FAILED'}: {lay} over {r['world_size']} ranks, {r['dtype']}{part}, "
            f"{r['tokens']} tokens{' + %d image' % r['images'] if r['images'] else ''}: "
            f"max |logit diff| {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:.3g}), "
            f"top-1 agreement {r['top1_agreement'] * 100:.1f}%")


def to_json(r: dict) -> str:
    return json.dumps(r, ensure_ascii=False, indent=2)
