"""``tanuki.json``: what a megatron checkpoint folder holds, written by conversion, training and the demo.

A torch_dist checkpoint alone does not say which model it is. Every checkpoint folder we write
carries this file: the architecture config (any registered one: Tanuki, Tanuki-vision, Nemotron-4), the dtype of the
stored weights, and the HF vocabulary size -- the row count of the embedding in the HF folder the
weights came from (65024 for Tanuki, the padded SentencePiece vocab), which is what ``mcore-to-hf``
must write back, whatever the tokenizer's own size. It lives on the models floor because convert,
train and demo all read or write it.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch

from megatron_tanuki.models.tanuki.config import TanukiConfig
from megatron_tanuki.models.tanuki_vision.model import TanukiVisionConfig

META_FILE = "tanuki.json"
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


class MetaError(ValueError):
    """A missing or malformed tanuki.json; the message names the file and the field."""


class CheckpointMeta(NamedTuple):
    """Unpacks as ``cfg, dtype, hf_vocab = read_meta(folder)``; fields readable by name too."""

    config: TanukiConfig | TanukiVisionConfig
    dtype: torch.dtype
    hf_vocab_size: int  # embedding rows of the HF folder the weights came from (config.json vocab_size)


def meta_json(cfg, dtype: torch.dtype, hf_vocab: int, source: str = "") -> str:
    """The text of tanuki.json. ``hf_vocab``: the HF config.json ``vocab_size`` to export with (not the
    tokenizer's piece count: a fine-tuned checkpoint carries its init checkpoint's value)."""
    return json.dumps({"format": "megatron_tanuki", "version": 1, "model": cfg.to_dict(),
                       "dtype": DTYPE_NAMES[dtype], "hf_vocab_size": int(hf_vocab), "source": source}, indent=2)


def write_meta(folder: str, cfg, dtype: torch.dtype, hf_vocab: int, source: str = "") -> None:
    with open(os.path.join(folder, META_FILE), "w", encoding="utf-8") as f:
        f.write(meta_json(cfg, dtype, hf_vocab, source))


HF_SIDE_DIR = "hf"  # a converted checkpoint's HF side files (config.json, tokenizer) -- convert/engine.py
TOKENIZER_FILE = "tokenizer.model"


def tokenizer_path(ckpt: str) -> str | None:
    """The SentencePiece model kept beside a converted checkpoint (``hf/tokenizer.model``), else None:
    `tanuki generate/serve` use it when no --tokenizer is given (a Nemotron-4 checkpoint brings its own)."""
    path = os.path.join(ckpt, HF_SIDE_DIR, TOKENIZER_FILE)
    return path if os.path.isfile(path) else None


LATEST = "latest"   # a training run's root names its newest checkpoint folder in this file


def resolve(path: str) -> str:
    """A checkpoint folder: ``path`` itself, or ``path/<latest>`` for a training run's root."""
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        full = os.path.join(path, name)
        if not os.path.isdir(full):
            raise FileNotFoundError(f"{latest} points at {name}, which does not exist")
        return full
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise FileNotFoundError(f"{path}: neither a checkpoint (metadata.json) nor a run folder ({LATEST})")
    return path


def read_meta(ckpt: str) -> CheckpointMeta:
    """(config, dtype, HF vocab size) of a checkpoint folder we wrote; bad files are named."""
    path = os.path.join(ckpt, META_FILE)
    if not os.path.isfile(path):
        raise MetaError(f"{ckpt}: no {META_FILE} (not written by megatron_tanuki)")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise MetaError(f"{path}: not valid JSON ({e})") from None
    for field in ("model", "dtype", "hf_vocab_size"):
        if field not in meta:
            raise MetaError(f"{path}: no field {field!r}")
    if meta["dtype"] not in DTYPES:
        raise MetaError(f"{path}: dtype {meta['dtype']!r} is not one of {', '.join(DTYPES)}")
    model = meta["model"]
    try:
        from megatron_tanuki.models.registry import config_from_dict

        cfg = config_from_dict(model)
    except (TypeError, KeyError) as e:
        raise MetaError(f"{path}: field 'model' does not describe a known model ({e})") from None
    return CheckpointMeta(cfg, DTYPES[meta["dtype"]], int(meta["hf_vocab_size"]))
