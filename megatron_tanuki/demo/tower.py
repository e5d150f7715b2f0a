"""The demo's stand-in for a pretrained SigLIP: the tiny tower learns the shapes images briefly.

No pretrained SigLIP can be downloaded here, so before the LLaVA recipe starts, the tiny tower is
trained (with a throw-away linear head on its S2 features) to tell colour, shape and position
apart. Then it is frozen for stages 1 and 2, as the real recipe freezes SigLIP-so400m. This step
also assembles the stage-1 initial checkpoint: the language model from the text pretraining, this
tower, a freshly initialized projector.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from megatron_tanuki.demo import shapes


def _labels(caption: str) -> list[int]:
    p = shapes.parse(caption)
    return [list(shapes.COLORS).index(p["color"]), shapes.SHAPES.index(p["shape"]),
            shapes.POSITIONS.index(p["position"])]


def pretrain_and_assemble(preset: str, llm_ckpt: str, stage1_json: str, image_folder: str, out: str,
                          steps: int = 150, images: int = 2000, seed: int = 0) -> dict:
    """Rank side (one process). Writes ``out`` (a torch_dist checkpoint + tanuki.json)."""
    from megatron_tanuki.convert.atomic import atomic_output_dir
    from megatron_tanuki.models.checkpoint_meta import META_FILE, meta_json
    from megatron_tanuki.data.images import load_image, preprocess
    from megatron_tanuki.data.tokenizer import TanukiTokenizer
    from megatron_tanuki.models.registry import get_preset
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.models.tanuki_vision.builder import build_vlm
    from megatron_tanuki.models.vision.s2 import s2_features
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed
    from megatron_tanuki.train import checkpoint as ckpt

    cfg = get_preset(preset)
    init_distributed(ParallelLayout(), cfg.llm, seed=seed)
    torch.manual_seed(seed)
    model = build_vlm(cfg, ParallelLayout(), BuildOptions(dtype="fp32"))[0]
    ckpt.load_weights(ckpt.resolve(llm_ckpt), [model.language_model])

    with open(stage1_json, encoding="utf-8") as f:
        records = json.load(f)[:images]
    pixels = torch.stack([preprocess(load_image(os.path.join(image_folder, r["image"]), r["image"]),
                                     cfg.image_size) for r in records]).half()
    labels = torch.tensor([_labels(r["conversations"][1]["value"]) for r in records])
    n_val = len(records) // 10
    tower = model.vision_model
    tower.requires_grad_(True)
    tower.train()
    sizes = (len(shapes.COLORS), len(shapes.SHAPES), len(shapes.POSITIONS))
    # Colour and shape are also read from the *mean* token, so that the tokens on the shape carry
    # them strongly, where the language model can attend to them; shape and position from the map.
    what = torch.nn.Linear(cfg.projector_input_size, sizes[0] + sizes[1])
    where = torch.nn.Linear(cfg.num_image_tokens * cfg.projector_input_size, sizes[1] + sizes[2])
    head = torch.nn.ModuleList([what, where])
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=4e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)

    def logits(x):
        feats = s2_features(tower, x.float(), cfg.s2)
        colour, shape_mean = what(feats.mean(1)).split(sizes[:2], dim=-1)
        shape, position = where(feats.flatten(1)).split(sizes[1:], dim=-1)
        return colour, shape, position, shape_mean

    for step in range(steps):
        idx = n_val + torch.randint(len(records) - n_val, (64,), generator=g)
        out_ = logits(pixels[idx])
        loss = sum(F.cross_entropy(o, labels[idx, k]) for k, o in enumerate(out_[:3]))
        loss = loss + F.cross_entropy(out_[3], labels[idx, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    tower.eval()
    with torch.no_grad():
        out_ = logits(pixels[:n_val])
    acc = {name: float((o.argmax(-1) == labels[:n_val, k]).float().mean())
           for k, (name, o) in enumerate(zip(("color", "shape", "position"), out_[:3]))}
    tower.requires_grad_(False)
    with atomic_output_dir(out, overwrite=True) as tmp:
        ckpt.save_sharded({"model0": model.sharded_state_dict()}, tmp)
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            f.write(meta_json(cfg, torch.float32, TanukiTokenizer().vocab_size, source="demo: tower + stage-0 LLM"))
    return {"val_accuracy": acc, "steps": steps, "images": len(records)}
