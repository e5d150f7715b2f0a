"""`tanuki model-info PRESET --plan tp=8,pp=2`: per-GPU weights and KV cache of a layout, before asking for nodes.

The model is built once on the meta device at TP=1 (one process, no memory, as ``registry.model_info``);
every parameter is then placed by rule rather than by building each rank:
- its pipeline stage: the embedding on the first, the final norm, output layer and a reward head on the
  last (with tied embeddings and PP > 1, the last stage also keeps its own copy of the embedding, as
  megatron-core allocates it), decoder layer ``i`` on stage ``i // (layers / pp)``;
- its TP share: megatron-core tags the parameters it splits (``tensor_model_parallel``, ``partition_dim``);
  those hold ``1/tp`` per rank, the rest (norms, biases of row-parallel layers, the router) are whole.
A stage's weight bytes are its parameters x bytes per parameter (bf16: 2; fp8: 1 for the decoder layers'
linear weights -- as stored FP8 parameters would be --, 2 for everything else). The KV cache is bf16: 2 (K, V) x the stage's layers x its share
of the query groups x head dim x 2 bytes per token. What is left of a card after the weights and a fixed
reserve (CUDA context, activations, workspace) is the KV cache; the stage with the least left decides.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import dataclass

GPUS = {"h100": 80e9, "h200": 141e9}  # memory per card, decimal bytes (H100 SXM 80 GB, H200 141 GB)
DEFAULT_RESERVE_GB = 4.0  # CUDA context, activations and workspace: not available to weights or KV
SEQUENCE = 4096  # the sequence length the report counts concurrent sequences of (Nemotron-4's context)
KV_BYTES = 2  # bf16 cache
_PARTS = {"embedding": "embedding", "decoder.final_layernorm": "final norm", "output_layer": "output layer",
          "rm_head": "reward head"}  # the parameters outside the decoder layers, by name prefix


class PlanError(ValueError):
    """A plan that cannot be made or does not fit: one line for the user, exit 2."""


@dataclass(frozen=True)
class Share:
    """One parameter of the TP=1 model: where it lives and how it splits."""

    name: str
    place: int | str  # a decoder layer index, or "first" / "last" / "tied" (the last stage when PP > 1)
    part: str | None  # "embedding", "output layer", ...: the non-layer part it belongs to
    numel: int
    split_size: int | None  # the size of its TP-split dimension; None when every TP rank holds it whole
    linear: bool  # a decoder layer's linear weight (1 byte under fp8)

    def per_rank(self, tp: int) -> int:
        if self.split_size is None:
            return self.numel
        if self.split_size % tp:
            raise PlanError(f"{self.name}: its TP-split dimension {self.split_size} is not divisible by TP={tp}")
        return self.numel // tp


def parse_plan(text: str) -> tuple[int, int]:
    """``tp=8,pp=2`` -> (8, 2); a missing size is 1."""
    sizes = {"tp": 1, "pp": 1}
    for item in (text or "").split(","):
        key, eq, value = item.strip().partition("=")
        if not eq or key not in sizes or not value.isdigit() or int(value) < 1:
            raise PlanError(f"--plan {text!r}: expected tp=N,pp=N with positive integers (e.g. tp=8,pp=2)")
        sizes[key] = int(value)
    return sizes["tp"], sizes["pp"]


def preset_config(preset: str):
    """The preset's config; a vision preset is refused (its tower and projector have no rule here)."""
    from megatron_tanuki.models import registry

    try:
        cfg = registry.get_preset(preset)
    except KeyError as e:
        raise PlanError(e.args[0]) from None
    if registry.language_model(cfg) is not cfg:
        raise PlanError(f"{preset}: --plan covers language models (tanuki-*, nemotron4-*); a vision model's "
                        f"tower and projector are not placed by it")
    return cfg


@functools.lru_cache(maxsize=8)
def shares(cfg) -> tuple[Share, ...]:
    """Every parameter of the model ``cfg`` (a language-model config) built at TP=1 on the meta device,
    with its stage and TP split."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_tanuki.models import registry

    model = registry.meta_model(cfg)
    linear_weights = {f"{m}.weight" for m, mod in model.named_modules()
                      if m.startswith("decoder.layers.") and isinstance(mod, (ColumnParallelLinear, RowParallelLinear))}
    out = []
    for name, p in model.named_parameters():
        if name.startswith("decoder.layers."):
            place, part = int(name.split(".")[2]), None
        else:
            part = next((label for prefix, label in _PARTS.items() if name.startswith(prefix + ".")), None)
            if part is None:
                raise PlanError(f"{cfg.name}: parameter {name} has no pipeline stage rule")
            place = "first" if part == "embedding" else "last"
        split = p.shape[p.partition_dim] if getattr(p, "tensor_model_parallel", False) else None
        out.append(Share(name, place, part, p.numel(), split, name in linear_weights))
    if cfg.tie_embeddings:  # with PP > 1 the last stage keeps its own copy of the tied embedding
        emb = next(s for s in out if s.part == "embedding")
        out.append(Share("output_layer.weight (tied)", "tied", "output layer", emb.numel, emb.split_size, False))
    return tuple(out)


def _stages(cfg, tp: int, pp: int, dtype: str) -> list[dict]:
    """Per pipeline stage: its layers, the other parts it holds, parameters and weight bytes per GPU."""
    layers = cfg.num_layers // pp
    stages = []
    for s in range(pp):
        first, last = s * layers, (s + 1) * layers - 1
        params = weight = 0
        parts: list[str] = []
        for sh in shares(cfg):
            held = (isinstance(sh.place, int) and first <= sh.place <= last) or (sh.place == "first" and s == 0) \
                or (sh.place == "last" and s == pp - 1) or (sh.place == "tied" and s == pp - 1 and pp > 1)
            if not held:
                continue
            n = sh.per_rank(tp)
            params += n
            weight += n * (1 if dtype == "fp8" and sh.linear else 2)
            if sh.part and sh.part not in parts:
                parts.append(sh.part)
        stages.append({"stage": s, "layers": [first, last], "parts": parts, "parameters": params,
                       "weight_bytes": weight})
    return stages


def make_plan(cfg, tp: int, pp: int, memory_bytes: float, dtype: str = "bf16",
              reserve_bytes: float = DEFAULT_RESERVE_GB * 1e9, kv_tokens: int | None = None,
              gpu: str | None = None) -> dict:
    """The numbers of ``cfg`` (a language-model preset) at TP x PP on cards of ``memory_bytes``;
    PlanError when the layout is impossible or the weights do not fit."""
    from megatron_tanuki.runtime.distributed import LayoutError, ParallelLayout

    if dtype not in ("bf16", "fp8"):
        raise PlanError(f"--dtype {dtype!r}: expected bf16 or fp8")
    try:  # the same checks a run makes: heads, query groups, FFN by TP; layers by PP
        ParallelLayout(tp=tp, pp=pp, sp=tp > 1).validate(tp * pp, cfg)
    except LayoutError as e:
        raise PlanError(str(e)) from None
    layers = cfg.num_layers // pp
    stages = _stages(cfg, tp, pp, dtype)
    kv_model = 2 * cfg.num_layers * cfg.num_query_groups * cfg.head_dim * KV_BYTES
    kv_gpu = 2 * layers * (cfg.num_query_groups // tp) * cfg.head_dim * KV_BYTES
    for st in stages:
        st["free_bytes"] = int(memory_bytes - st["weight_bytes"] - reserve_bytes)
    worst = min(stages, key=lambda st: st["free_bytes"])
    plan = {
        "preset": cfg.name, "tp": tp, "pp": pp, "gpus": tp * pp, "gpu": gpu, "gpu_memory_bytes": int(memory_bytes),
        "dtype": dtype, "bytes_per_parameter": {"decoder_linear_weights": 1 if dtype == "fp8" else 2, "other": 2},
        "reserve_bytes": int(reserve_bytes), "stages": stages, "worst_stage": worst["stage"],
        "weight_bytes_per_gpu": worst["weight_bytes"], "parameters_per_gpu": worst["parameters"],
        "kv_bytes_per_token": kv_model, "kv_bytes_per_token_per_gpu": kv_gpu,
        "kv_shape": {"layers_per_gpu": layers, "query_groups": cfg.num_query_groups,
                     "query_groups_per_gpu": cfg.num_query_groups // tp, "head_dim": cfg.head_dim},
        "free_bytes_per_gpu": worst["free_bytes"], "sequence_length": SEQUENCE,
    }
    if worst["free_bytes"] <= 0:
        raise PlanError(_refusal(plan, cfg))
    plan["fits"] = True
    plan["sequences"] = worst["free_bytes"] // (kv_gpu * SEQUENCE)
    plan["tokens"] = worst["free_bytes"] // kv_gpu
    if kv_tokens is not None:
        plan["kv_tokens"] = {"requested": kv_tokens, "bytes_per_gpu": kv_tokens * kv_gpu,
                             "fits": kv_tokens <= plan["tokens"]}
    return plan


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _card(plan: dict) -> str:
    return f"{plan['gpu'].upper()} ({_gb(plan['gpu_memory_bytes'])})" if plan["gpu"] else \
        f"{_gb(plan['gpu_memory_bytes'])} GPU"


def _refusal(plan: dict, cfg) -> str:
    """The one line for a layout whose weights do not fit, with the smallest larger PP that would."""
    needed = plan["weight_bytes_per_gpu"]
    available = plan["gpu_memory_bytes"] - plan["reserve_bytes"]
    hint = ""
    for pp in range(plan["pp"] + 1, cfg.num_layers + 1):
        if cfg.num_layers % pp == 0:
            bytes_ = max(st["weight_bytes"] for st in _stages(cfg, plan["tp"], pp, plan["dtype"]))
            if bytes_ < available:
                hint = f"; pp={pp} would need {_gb(bytes_)} per GPU"
                break
    return (f"{plan['preset']} at tp={plan['tp']},pp={plan['pp']} ({plan['dtype']}) does not fit on "
            f"{_card(plan)}: {_gb(needed)} of weights per GPU (stage {plan['worst_stage']}), "
            f"{_gb(available)} available ({_gb(plan['gpu_memory_bytes'])} - {_gb(plan['reserve_bytes'])} "
            f"reserve){hint}")


def format_plan(plan: dict) -> str:
    st = plan["stages"][plan["worst_stage"]]
    bpp = plan["bytes_per_parameter"]
    lines = [f"{plan['preset']}: tp={plan['tp']},pp={plan['pp']} = {plan['gpus']} x {_card(plan)}, "
             f"{plan['dtype']} weights"]
    if plan["dtype"] == "fp8":
        lines.append("  fp8: decoder layers' linear weights at 1 byte per parameter; embeddings, output layer, "
                     "norms (and a reward head) at 2 (bf16)")
    lines.append(f"  weights per GPU: {_gb(plan['weight_bytes_per_gpu'])} ({plan['weight_bytes_per_gpu']:,} bytes;"
                 f" stage {st['stage']} of {plan['pp']}, {plan['parameters_per_gpu']:,} parameters"
                 + (f" x {bpp['other']} bytes)" if plan["dtype"] == "bf16" else ")"))
    for s in plan["stages"]:
        extra = "".join(f" + {p}" for p in s["parts"])
        lines.append(f"    stage {s['stage']}: layers {s['layers'][0]}-{s['layers'][1]}{extra}: "
                     f"{s['parameters']:,} parameters, {_gb(s['weight_bytes'])}")
    kv = plan["kv_shape"]
    lines.append(f"  KV cache (bf16): {plan['kv_bytes_per_token']:,} bytes per token for the whole model; per GPU "
                 f"{plan['kv_bytes_per_token_per_gpu']:,} = 2 (K, V) x {kv['layers_per_gpu']} layers x "
                 f"{kv['query_groups_per_gpu']} of {kv['query_groups']} query groups x head dim {kv['head_dim']} "
                 f"x {KV_BYTES} bytes")
    lines.append(f"  free per GPU for the KV cache: {_gb(plan['free_bytes_per_gpu'])} = "
                 f"{_gb(plan['gpu_memory_bytes'])} - {_gb(plan['weight_bytes_per_gpu'])} weights - "
                 f"{_gb(plan['reserve_bytes'])} reserve (CUDA context, activations, workspace; --reserve-gb)")
    lines.append(f"  fits: {plan['sequences']:,} concurrent {plan['sequence_length']}-token sequences "
                 f"({plan['tokens']:,} tokens of KV cache)")
    if "kv_tokens" in plan:
        k = plan["kv_tokens"]
        verdict = "fits" if k["fits"] else f"does NOT fit (at most {plan['tokens']:,} tokens)"
        lines.append(f"  --kv-tokens {k['requested']:,}: {verdict}: {_gb(k['bytes_per_gpu'])} of KV per GPU, "
                     f"{_gb(plan['free_bytes_per_gpu'])} free")
    return "\n".join(lines)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The --plan options of `tanuki model-info` (its --json is the parser's own)."""
    g = parser.add_argument_group("layout plan (--plan)")
    g.add_argument("--plan", default=None, metavar="tp=N,pp=N",
                   help="per-GPU weights, KV bytes per token and concurrent 4096-token sequences for this layout")
    g.add_argument("--kv-tokens", type=int, default=None, metavar="N", help="with --plan: do N tokens of KV cache fit?")
    cards = g.add_mutually_exclusive_group()
    cards.add_argument("--gpu", choices=sorted(GPUS), default=None, help="with --plan: the card (default h100: "
                       "80 GB; h200: 141 GB)")
    cards.add_argument("--gpu-memory-gb", type=float, default=None, metavar="G",
                       help="with --plan: memory per GPU, decimal GB")
    g.add_argument("--dtype", choices=["bf16", "fp8"], default=None,
                   help="with --plan: weights in bf16 (default) or fp8 (decoder linear weights 1 byte)")
    g.add_argument("--reserve-gb", type=float, default=None, metavar="R",
                   help="with --plan: GB per GPU kept for CUDA context, activations, workspace "
                        f"(default {DEFAULT_RESERVE_GB:g})")


_PLAN_ONLY = ("kv_tokens", "gpu", "gpu_memory_gb", "dtype", "reserve_gb")


def wanted(args) -> bool:
    """True when the command line asks for a plan (or gives a plan option without --plan: an error)."""
    return getattr(args, "plan", None) is not None or any(getattr(args, k, None) is not None for k in _PLAN_ONLY)


def run_plan(args) -> int:
    """Print the plan (human or --json); a plan that cannot be made is one line on stderr, exit 2."""
    try:
        plan = _plan_from_args(args)
    except PlanError as e:
        print(f"tanuki model-info: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2) if getattr(args, "json", False) else format_plan(plan))
    return 0


def _plan_from_args(args) -> dict:
    if args.plan is None:
        given = [f"--{k.replace('_', '-')}" for k in _PLAN_ONLY if getattr(args, k, None) is not None]
        raise PlanError(f"{', '.join(given)} only with --plan tp=N,pp=N")
    if getattr(args, "list", False) or not args.preset:
        raise PlanError("--plan needs one PRESET (not --list)")
    tp, pp = parse_plan(args.plan)
    if args.gpu_memory_gb is not None:
        if args.gpu_memory_gb <= 0:
            raise PlanError(f"--gpu-memory-gb {args.gpu_memory_gb:g}: must be positive")
        gpu, memory = None, args.gpu_memory_gb * 1e9
    else:
        gpu = args.gpu or "h100"
        memory = GPUS[gpu]
    reserve = DEFAULT_RESERVE_GB if args.reserve_gb is None else args.reserve_gb
    if reserve < 0:
        raise PlanError(f"--reserve-gb {reserve:g}: must not be negative")
    if args.kv_tokens is not None and args.kv_tokens < 1:
        raise PlanError(f"--kv-tokens {args.kv_tokens}: must be a positive number of tokens")
    return make_plan(preset_config(args.preset), tp, pp, memory, args.dtype or "bf16", reserve * 1e9,
                     args.kv_tokens, gpu)
