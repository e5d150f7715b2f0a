"""`tanuki convert verify`: the converted checkpoint, under a parallel layout, against transformers.

The HF side is built with transformers' own classes (LlamaForCausalLM, or our TanukiForCausalLM
for the MoE -- never code from the checkpoint folder; for Tanuki-vision the LLaVA-JP forward
assembled from SiglipVisionModel + projector + that LLM, models/tanuki_vision/hf_reference.py);
the Megatron side loads the torch_dist checkpoint into the requested TP/PP/EP layout over that
many processes (gloo on CPU). Both run in fp32 on the same tokens (and image); we report the max
absolute logit difference and top-1 agreement.
"""
from __future__ import annotations

import json
import os

import torch

from megatron_tanuki.convert.engine import read_meta

DEFAULT_TEXT = "たぬきは日本の森に住む動物で、夜になると食べ物を探しに出かけます。"
DEFAULT_VLM_TEXT = "<image>\nこの画像について説明してください。赤い円があります。"


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


def _rank_logits(ckpt: str, layout: dict, ids: torch.Tensor, images: torch.Tensor | None = None):
    """Rank side: load the checkpoint into the layout, return full logits on one rank."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model
    from megatron_tanuki.models.tanuki_vision.builder import build_vlm
    from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed

    cfg, _, hf_vocab = read_meta(ckpt)
    vlm = isinstance(cfg, TanukiVisionConfig)
    par = ParallelLayout(**layout)
    init_distributed(par, cfg.llm if vlm else cfg)
    chunks = (build_vlm if vlm else build_model)(cfg, par, BuildOptions(dtype="fp32", perform_initialization=False))
    sharded = {f"chunk{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    state = dist_checkpointing.load(sharded, ckpt)
    for i, c in enumerate(chunks):
        c.load_state_dict(state[f"chunk{i}"], strict=True)
        c.eval()
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    if torch.cuda.is_available():
        ids, pos = ids.cuda(), pos.cuda()
        images = images.cuda() if images is not None else None

    def forward_step(data_iterator, model):
        next(data_iterator)
        out = model(ids, pos, None, images=images) if vlm else model(ids, pos, None)

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


def _vlm_inputs(cfg, text: str, image: str | None):
    from megatron_tanuki.data.images import load_image, preprocess, sample_image
    from megatron_tanuki.data.templates import IMAGE_MARK, tokenize_with_image
    from megatron_tanuki.data.tokenizer import TanukiTokenizer

    n_marks = text.count(IMAGE_MARK)
    if n_marks != 1:
        raise ValueError(f"verify --text needs exactly one {IMAGE_MARK} for its one image, found {n_marks}")
    pil = load_image(image, "verify --image") if image else sample_image(cfg.image_size)
    return tokenize_with_image(TanukiTokenizer(), text, bos=True), preprocess(pil, cfg.image_size).unsqueeze(0)


def verify(hf_dir: str, ckpt: str, tp: int = 1, pp: int = 1, ep: int = 1, text: str | None = None,
           tolerance: float = 1e-4, image: str | None = None, vision_dir: str | None = None) -> dict:
    from megatron_tanuki.data.tokenizer import TanukiTokenizer
    from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig, expand_image_tokens
    from megatron_tanuki.runtime.spawn import run_ranks

    cfg, _, _ = read_meta(ckpt)
    images = None
    if isinstance(cfg, TanukiVisionConfig):
        from megatron_tanuki.convert.sources import open_source
        from megatron_tanuki.models.tanuki_vision.hf_reference import LlavaJpReference

        raw_ids, images = _vlm_inputs(cfg, text or DEFAULT_VLM_TEXT, image)
        hf_cfg, src = open_source(hf_dir, vision_dir)
        with torch.no_grad():
            ref = LlavaJpReference.from_source(hf_cfg, src)(raw_ids, images).float()
        ids = torch.tensor([expand_image_tokens(raw_ids, None, cfg.num_image_tokens)[0]])
    else:
        ids = torch.tensor([TanukiTokenizer().encode(text or DEFAULT_TEXT, bos=True)])
        ref = hf_reference_logits(hf_dir, ids)
    moe = cfg.is_moe
    layout = {"tp": tp, "pp": pp, "ep": ep, "sp": tp > 1 and moe}  # MoE with TP needs SP
    world = tp * pp * ep
    if layout["sp"] and ids.shape[1] % tp:  # sequence parallel splits the sequence: pad with </s>
        ids = torch.cat([ids, torch.full((1, tp - ids.shape[1] % tp), 2)], dim=1)
    got = next(r for r in run_ranks(_rank_logits, world, ckpt, layout, ids, images) if r is not None)
    got = got[:, :ref.shape[1]]
    diff = (got - ref).abs().max().item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return {"hf": os.path.abspath(hf_dir), "ckpt": os.path.abspath(ckpt), "layout": layout,
            "world_size": world, "tokens": ref.shape[1], "images": 0 if images is None else images.shape[0],
            "max_abs_diff": diff, "top1_agreement": top1, "tolerance": tolerance,
            "ok": diff <= tolerance and top1 == 1.0}


def format_result(r: dict) -> str:
    lay = " ".join(f"{k.upper()}={v}" for k, v in r["layout"].items() if k != "sp") + (" SP" if r["layout"]["sp"] else "")
    return (f"verify {'OK' if r['ok'] else 'FAILED'}: {lay} over {r['world_size']} ranks, {r['tokens']} tokens"
            f"{' + %d image' % r['images'] if r['images'] else ''}: "
            f"max |logit diff| {r['max_abs_diff']:.3g} (tolerance {r['tolerance']:g}), "
            f"top-1 agreement {r['top1_agreement'] * 100:.1f}%")


def to_json(r: dict) -> str:
    return json.dumps(r, ensure_ascii=False, indent=2)
