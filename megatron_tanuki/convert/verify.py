"""`tanuki convert verify`: the converted checkpoint, under a parallel layout, against transformers.

The HF side is built with transformers' own classes (LlamaForCausalLM, or our TanukiForCausalLM
for the MoE -- never code from the checkpoint folder); the Megatron side loads the torch_dist
checkpoint into the requested TP/PP/EP layout over that many processes (gloo on CPU). Both run
in fp32 on the same token ids; we report the max absolute logit difference and top-1 agreement.
"""
from __future__ import annotations

import json
import os

import torch

from megatron_tanuki.convert.engine import read_meta

DEFAULT_TEXT = "たぬきは日本の森に住む動物で、夜になると食べ物を探しに出かけます。"


def hf_reference_logits(hf_dir: str, ids: torch.Tensor) -> torch.Tensor:
    from megatron_tanuki.convert.safetensors_io import HFCheckpoint
    from megatron_tanuki.models.tanuki.hf_config import from_hf_config

    src = HFCheckpoint(hf_dir)
    cfg = from_hf_config(src.config, os.path.join(src.path, "config.json"))
    if cfg.is_moe:
        from megatron_tanuki.models.tanuki.hf import load_remote_code_classes

        _, model_cls = load_remote_code_classes()
    else:
        from transformers import LlamaForCausalLM as model_cls
    model = model_cls.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _rank_logits(ckpt: str, layout: dict, ids: torch.Tensor):
    """Rank side: load the checkpoint into the layout, return full logits on one rank."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed

    cfg, _, hf_vocab = read_meta(ckpt)
    par = ParallelLayout(**layout)
    init_distributed(par, cfg)
    chunks = build_model(cfg, par, BuildOptions(dtype="fp32", perform_initialization=False))
    sharded = {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    state = dist_checkpointing.load(sharded, ckpt)
    for i, c in enumerate(chunks):
        c.load_state_dict(state[f"chunk{i}"], strict=True)
        c.eval()
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    if torch.cuda.is_available():
        ids, pos = ids.cuda(), pos.cuda()

    def forward_step(data_iterator, model):
        next(data_iterator)
        out = model(ids, pos, None)

        def collect(output_tensor, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output_tensor)

        return out, collect

    iters = [iter([None]) for _ in chunks]
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1,
            seq_length=ids.shape[1], micro_batch_size=1, forward_only=True, collect_non_loss_data=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    first_of_group = parallel_state.get_tensor_model_parallel_rank() == 0 and \
        parallel_state.get_data_parallel_rank() == 0
    if last and first_of_group and store:
        return store[0][..., :hf_vocab].float().cpu()
    return None


def verify(hf_dir: str, ckpt: str, tp: int = 1, pp: int = 1, ep: int = 1, text: str | None = None,
           tolerance: float = 1e-4) -> dict:
    from megatron_tanuki.data.tokenizer import TanukiTokenizer
    from megatron_tanuki.runtime.spawn import run_ranks

    cfg, _, _ = read_meta(ckpt)
    ids = torch.tensor([TanukiTokenizer().encode(text or DEFAULT_TEXT, bos=True)])
    ref = hf_reference_logits(hf_dir, ids)
    layout = {"tp": tp, "pp": pp, "ep": ep, "sp": tp > 1 and cfg.is_moe}  # MoE with TP needs SP
    world = tp * pp * ep
    got = next(r for r in run_ranks(_rank_logits, world, ckpt, layout, ids) if r is not None)
    diff = (got - ref).abs().max().item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return {"hf": os.path.abspath(hf_dir), "ckpt": os.path.abspath(ckpt), "layout": layout,
            "world_size": world, "tokens": ids.shape[1], "max_abs_diff": diff, "top1_agreement": top1,
            "tolerance": tolerance, "ok": diff <= tolerance and top1 == 1.0}


def format_result(r: dict) -> str:
    lay = " ".join(f"{k.upper()}={v}" for k, v in r["layout"].items() if k != "sp") + (" SP" if r["layout"]["sp"] else "")
    return (f"verify {'OK' if r['ok'] else 'FAILED'}: {lay} over {r['world_size']} ranks, {r['tokens']} tokens: "
            f"max |logit diff| {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:g}), "
            f"top-1 agreement {r['top1_agreement'] * 100:.1f}%")


def to_json(r: dict) -> str:
    return json.dumps(r, ensure_ascii=False, indent=2)
