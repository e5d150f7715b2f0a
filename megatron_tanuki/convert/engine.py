"""The streaming conversion engine: HF folder <-> megatron-core torch_dist checkpoint.

One table per architecture (models/tanuki/hf_map.py, models/tanuki_vision/hf_map.py) drives both
directions, one rule (one megatron parameter) at a time, so peak memory is a few tensors, never
the model.

A converted megatron checkpoint folder holds the torch_dist files, ``tanuki.json`` (architecture,
dtype, HF vocab size), ``hf/`` (the source config.json, tokenizer and other side files), which is
how ``mcore-to-hf`` gives back the same config fields, and for Tanuki-vision ``carried/``: the
SigLIP tensors the model never computes, kept so the round trip returns every source tensor.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass

import torch

from megatron_tanuki.convert import mcore_io, transforms
from megatron_tanuki.convert.atomic import atomic_output_dir
from megatron_tanuki.convert.safetensors_io import CheckpointError, HFCheckpoint, ShardedWriter
from megatron_tanuki.convert.sources import open_source
from megatron_tanuki.models.checkpoint_meta import DTYPE_NAMES as _DTYPE_NAMES
from megatron_tanuki.models.checkpoint_meta import HF_SIDE_DIR  # noqa: F401  (re-exported: engine.HF_SIDE_DIR)
from megatron_tanuki.models.checkpoint_meta import META_FILE, meta_json, read_meta, write_meta  # noqa: F401
from megatron_tanuki.models import registry
from megatron_tanuki.models.tanuki import hf_map
from megatron_tanuki.models.tanuki.config import TanukiConfig
from megatron_tanuki.models.tanuki.hf import AUTO_MAP, HF_DIR, REMOTE_CODE_FILES
from megatron_tanuki.models.tanuki_vision.hf_config import siglip_to_hf
from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig

CARRIED_DIR = "carried"


@dataclass
class ConvertStats:
    tensors: int
    bytes: int


def byte_progress(total_bytes: int, desc: str):
    """A tqdm bar counting bytes on stderr: GB done, GB/s, time left. Long conversions (94 GB for
    Tanuki-8x8B) otherwise print nothing for many minutes. Shown when stderr is a terminal;
    TANUKI_PROGRESS=1 forces it on (logs), 0 off."""
    from tqdm import tqdm

    from megatron_tanuki.runtime.progress import progress_disabled

    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                disable=progress_disabled(), mininterval=0.5, dynamic_ncols=True)


def bound_rules(cfg, hf_vocab: int):
    """(Rule, Shape) pairs of the architecture, in streaming order (its registry record's table)."""
    yield from registry.architecture_of(cfg).hf_rules(cfg, hf_vocab)


def _is_carried(cfg, name: str) -> bool:
    return registry.architecture_of(cfg).is_carried(name, cfg)


def expected_hf_shapes(cfg, hf_vocab: int, mcore_shapes: dict, rules=None) -> dict[str, tuple]:
    """HF tensor shapes implied by the config: the table's transforms run on meta tensors."""
    out = {}
    for rule, shape in (rules if rules is not None else bound_rules(cfg, hf_vocab)):
        meta = torch.empty(mcore_shapes[rule.mcore], device="meta")
        for name, t in zip(rule.hf, transforms.to_hf(rule.transform, meta, shape)):
            out[name] = tuple(t.shape)
    return out


def _check_names(src, cfg, expected: dict, config_name: str = "config.json") -> None:
    names = set(src.names())
    ignored = [re.compile(p) for p in hf_map.IGNORED_HF]
    unexpected = sorted(n for n in names - set(expected)
                        if not any(p.fullmatch(n) for p in ignored) and not _is_carried(cfg, n))
    llm = registry.language_model(cfg)
    if llm.is_moe:
        found = {int(m.group(1)) for n in names
                 if (m := re.match(r"model\.layers\.\d+\.block_sparse_moe\.experts\.(\d+)\.", n))}
        if found and len(found) != llm.num_experts:
            raise CheckpointError(
                f"{src.path}/{config_name} says num_local_experts={llm.num_experts}, but the weights hold "
                f"{len(found)} experts (block_sparse_moe.experts.{min(found)}..{max(found)})")
    if unexpected:
        raise CheckpointError(
            f"{src.path}: tensor {unexpected[0]} (in {src.shard_of[unexpected[0]]}) is not part of a "
            f"{cfg.name} model" + (f" ({len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    missing = [n for n in expected if n not in names]
    if missing:
        raise CheckpointError(f"{src.path}: tensor {missing[0]} is missing"
                              + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""))
    for n, shp in expected.items():
        if src.shape(n) != shp:
            raise CheckpointError(
                f"{src.path}/{src.shard_of[n]}: tensor {n} has shape {list(src.shape(n))}, "
                f"{config_name} implies {list(shp)}")


def hf_to_mcore(hf_dir: str, out: str, overwrite: bool = False, vision_dir: str | None = None) -> ConvertStats:
    cfg, src = open_source(hf_dir, vision_dir)
    return source_to_mcore(src, out, overwrite, cfg)


def source_to_mcore(src, out: str, overwrite: bool = False, cfg=None, dtype: torch.dtype | None = None,
                    rules=None, config_name: str = "config.json") -> ConvertStats:
    """Any HF-like source (names/shape/dtype/nbytes/get/config/side_files/path) -> torch_dist.

    ``rules``: (Rule, Shape) pairs naming the source's tensors (default: the architecture's HF table;
    the NeMo reader passes its own). ``dtype``: the checkpoint's dtype, each tensor cast to it (default:
    the one float dtype all source tensors share; a NeMo checkpoint stores fp32 norms beside bf16).
    ``config_name``: the source file that defines the shapes, for error messages.
    """
    if cfg is None:
        cfg = registry.from_hf_config(src.config, os.path.join(src.path, "config.json"))
    hf_vocab = int(src.config["vocab_size"])
    rules = list(rules if rules is not None else bound_rules(cfg, hf_vocab))
    carried = [n for n in src.names() if _is_carried(cfg, n)]
    dtypes = {src.dtype(n) for n in src.names() if n not in carried}
    if dtype is None:
        if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPE_NAMES:
            raise CheckpointError(f"{src.path}: tensors must share one float dtype, found {sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
    _, _, mcore_shapes = mcore_io.model_layout(cfg, dtype)
    _check_names(src, cfg, expected_hf_shapes(cfg, hf_vocab, mcore_shapes, rules), config_name)

    by_mcore = dict((r.mcore, (r, shape)) for r, shape in rules)
    stats = ConvertStats(0, 0)

    def fetch(name: str) -> torch.Tensor:
        rule, shape = by_mcore[name]
        t = transforms.to_mcore(rule.transform, [src.get(n).to(dtype) for n in rule.hf], shape)
        stats.tensors += len(rule.hf)
        nbytes = sum(src.nbytes(n) for n in rule.hf)
        stats.bytes += nbytes
        bar.update(nbytes)
        return t

    with atomic_output_dir(out, overwrite) as tmp, \
            byte_progress(sum(src.nbytes(n) for n in src.names()), "hf-to-mcore") as bar:
        mcore_io.write_checkpoint(tmp, cfg, dtype, fetch)
        if carried:
            os.makedirs(os.path.join(tmp, CARRIED_DIR))
            writer = ShardedWriter(os.path.join(tmp, CARRIED_DIR), [(n, src.shape(n), src.dtype(n)) for n in carried],
                                   max_shard_bytes=2**62)
            for n in carried:
                writer.add(n, src.get(n))
                stats.tensors += 1
                stats.bytes += src.nbytes(n)
                bar.update(src.nbytes(n))
            writer.close()
        write_meta(tmp, cfg, dtype, hf_vocab, source=src.path)
        side = os.path.join(tmp, HF_SIDE_DIR)
        os.makedirs(side)
        for f in src.side_files():  # a name, or (name in the source, name to give it)
            name, dest = f if isinstance(f, tuple) else (f, f)
            shutil.copy2(os.path.join(src.path, name), os.path.join(side, dest))
        with open(os.path.join(side, "config.json"), "w", encoding="utf-8") as f:
            json.dump(src.config, f, indent=2, ensure_ascii=False)
    return stats


def hf_config_for_export(ckpt: str, cfg, hf_vocab: int) -> dict:
    path = os.path.join(ckpt, HF_SIDE_DIR, "config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
        if isinstance(cfg, TanukiVisionConfig) and "vision_config" not in hf:
            hf["vision_config"] = siglip_to_hf(cfg.vision)  # self-contained: no hub lookup to re-import
        return hf
    return registry.architecture_of(cfg).hf_config_out(cfg, hf_vocab)


def write_hf_side(folder: str, hf_config: dict, cfg, side_files=()) -> None:
    """config.json (with our auto_map for the MoE LLM), side files, and the MoE's remote code."""
    for path in side_files:
        if os.path.basename(path) != "config.json":
            shutil.copy2(path, os.path.join(folder, os.path.basename(path)))
    if isinstance(cfg, TanukiConfig) and cfg.is_moe:
        hf_config = {**hf_config, "auto_map": AUTO_MAP, "model_type": "tanuki",
                     "architectures": ["TanukiForCausalLM"]}
        for f in REMOTE_CODE_FILES:
            shutil.copy2(os.path.join(HF_DIR, f), os.path.join(folder, f))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, ensure_ascii=False)


def mcore_to_hf(ckpt: str, out: str, overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> ConvertStats:
    cfg, dtype, hf_vocab = read_meta(ckpt)
    reader = mcore_io.CheckpointReader(ckpt)
    _, pieces, mcore_shapes = mcore_io.model_layout(cfg, dtype)
    carried = HFCheckpoint(os.path.join(ckpt, CARRIED_DIR), require_config=False) \
        if os.path.isdir(os.path.join(ckpt, CARRIED_DIR)) else None
    stats = ConvertStats(0, 0)
    plan = [(n, s, dtype) for n, s in expected_hf_shapes(cfg, hf_vocab, mcore_shapes).items()]
    plan += [(n, carried.shape(n), carried.dtype(n)) for n in carried.names()] if carried else []
    total = sum(math.prod(s) * d.itemsize for _, s, d in plan)
    with atomic_output_dir(out, overwrite) as tmp, byte_progress(total, "mcore-to-hf") as bar:
        writer = ShardedWriter(tmp, plan, max_shard_bytes)
        try:
            for rule, shape in bound_rules(cfg, hf_vocab):
                t = reader.read_param(pieces[rule.mcore], mcore_shapes[rule.mcore], dtype)
                for name, hf_t in zip(rule.hf, transforms.to_hf(rule.transform, t, shape)):
                    writer.add(name, hf_t)
                    stats.tensors += 1
                    stats.bytes += hf_t.numel() * hf_t.element_size()
                    bar.update(hf_t.numel() * hf_t.element_size())
            for name in carried.names() if carried else ():
                writer.add(name, carried.get(name))
                stats.tensors += 1
                stats.bytes += carried.nbytes(name)
                bar.update(carried.nbytes(name))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        side = os.path.join(ckpt, HF_SIDE_DIR)
        side_files = [os.path.join(side, f) for f in sorted(os.listdir(side))] if os.path.isdir(side) else []
        write_hf_side(tmp, hf_config_for_export(ckpt, cfg, hf_vocab), cfg, side_files)
    return stats
