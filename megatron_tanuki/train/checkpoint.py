"""Training checkpoints: megatron-core ``torch_dist``, published atomically, ``latest``, keep-last-K.

Layout of ``checkpoint.dir``::

    iter_0000100/   torch_dist files (model, optimizer, scheduler, data position, step)
                    config.yaml (the resolved run config), tanuki.json (so `tanuki convert
                    mcore-to-hf` reads it like a converted checkpoint), hf/ and carried/ copied
                    from the initial checkpoint when it had them
    latest          text file: "iter_0000100"

A checkpoint is written under ``.tmp-iter_...`` and renamed when every rank has finished; then
``latest`` is replaced (write + rename), then old ones beyond ``keep_last`` are removed. A crash at
any moment leaves ``latest`` on a complete checkpoint. The optimizer state is saved
``fully_reshardable``: it loads under another TP/PP/EP/DP layout.
"""
from __future__ import annotations

import os
import re
import shutil

import torch.distributed as dist
from megatron.core import dist_checkpointing

LATEST = "latest"
OPTIM_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
_ITER = re.compile(r"^iter_(\d{7})$")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


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


def _unwrap(chunk):
    """The model inside megatron-core's DDP (whose state dict keys gain a ``module.`` level)."""
    return getattr(chunk, "module", chunk)


def model_state(chunks) -> dict:
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save(root: str, step: int, chunks, optimizer, scheduler, common: dict, side: dict, keep_last: int | None,
         async_save: bool = False) -> str:
    """Collective: every rank calls it. ``side``: {file name: text} and {"copy": [dirs]} for rank 0."""
    rank = dist.get_rank()
    name = iter_name(step)
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    state = model_state(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False, metadata=OPTIM_SHARDING)
    state["scheduler"] = scheduler.state_dict()
    state.update(common)
    dist_checkpointing.save(state, tmp, async_sharded_save=False)
    # async_save is accepted for forward compatibility; on CPU/gloo the write is synchronous.
    dist.barrier()
    if rank == 0:
        for fname, text in side.get("files", {}).items():
            with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                f.write(text)
        for src in side.get("copy", []):
            shutil.copytree(src, os.path.join(tmp, os.path.basename(src.rstrip("/"))))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = os.path.join(root, f".{LATEST}.tmp")
        with open(pointer, "w") as f:
            f.write(name + "\n")
        os.replace(pointer, os.path.join(root, LATEST))
        if keep_last:
            done = sorted(d for d in os.listdir(root) if _ITER.match(d))
            for old in done[:-keep_last]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def load_training_state(ckpt: str, chunks, optimizer, scheduler, common_keys) -> dict:
    """Model, optimizer, scheduler and the ``common_keys`` entries, from a training checkpoint."""
    state = model_state(chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=OPTIM_SHARDING)
    loaded = dist_checkpointing.load(state, ckpt)
    for i, c in enumerate(chunks):
        _unwrap(c).load_state_dict(loaded[f"model{i}"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    common = dist_checkpointing.load_common_state_dict(ckpt)
    scheduler.load_state_dict(common["scheduler"])
    return {k: common[k] for k in common_keys}


def checkpoint_keys(ckpt: str) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(ckpt).read_metadata().state_dict_metadata)


def load_weights(ckpt: str, chunks, allow_missing=(), log=print) -> list[str]:
    """Model weights only (an initial checkpoint: converted, or another run's). Parameters whose
    names start with one of ``allow_missing`` may be absent (they keep their initialization);
    returns those. ``chunks`` may be sub-modules: an LLM checkpoint loads into a VLM's
    ``language_model`` (its keys have no prefix there)."""
    keys = checkpoint_keys(ckpt)
    missing = []
    for i, c in enumerate(chunks):
        c = _unwrap(c)
        sd = c.sharded_state_dict()
        wanted, absent = {}, []
        for name, sh in sd.items():
            key = getattr(sh, "key", None)
            if key is None:
                continue
            if key in keys:
                wanted[name] = sh
            elif name.startswith(tuple(allow_missing)):
                absent.append(name)
            elif not name.endswith("_extra_state"):
                raise KeyError(f"{ckpt}: checkpoint has no {key} (parameter {name})")
        loaded = dist_checkpointing.load(wanted, ckpt)
        c.load_state_dict(loaded, strict=False)
        missing += absent
    if missing:
        log(f"[train] not in {ckpt}, kept as initialized: {len(missing)} tensors ({missing[0]} ...)")
    return missing
