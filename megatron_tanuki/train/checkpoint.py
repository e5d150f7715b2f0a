"""Training checkpoints: megatron-core ``torch_dist``, published atomically, ``latest``, keep-last-K.

Layout of ``checkpoint.dir``::

    iter_0000100/   torch_dist files (model, optimizer, scheduler, data position, step)
                    config.yaml (the resolved run config), tanuki.json (so `tanuki convert
                    mcore-to-hf` reads it like a converted checkpoint), hf/ and carried/ copied
                    from the initial checkpoint when it had them
    latest          text file: "iter_0000100"

A checkpoint is written under ``.tmp-iter_...``, its files and folder are fsynced, and it is renamed
when every rank has finished; then ``latest`` is replaced (write, fsync, rename, fsync the folder),
then old ones beyond ``keep_last`` are removed. A crash or power loss at any moment leaves ``latest``
on a complete checkpoint. Retention orders checkpoints by iteration number (not by name) and never
removes the one ``latest`` names. After a manual rollback (``latest`` pointed at an older one), the
first save of the resumed run renames the newer checkpoints of the abandoned line to
``abandoned-iter_...``: kept for the user, never counted or removed by ``keep_last``.
The optimizer state is saved ``fully_reshardable``: it loads under another TP/PP/EP/DP layout.

``check_run_folder`` refuses a run folder saved by another model preset or training mode (a tiny
``LOCAL=1`` run in the cluster run's folder); ``python -m megatron_tanuki.train.checkpoint check``
is the same check for slurm/common.sh. torch.distributed and megatron-core are imported inside the
functions that need them, so that check starts in a fraction of a second.
"""
from __future__ import annotations

import os
import re
import shutil
import sys

import yaml

from megatron_tanuki.models.checkpoint_meta import LATEST, resolve  # noqa: F401 (re-exported)

OPTIM_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
_ITER = re.compile(r"^iter_(\d{7,})$")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def latest_name(root: str) -> str | None:
    """The folder name ``root/latest`` points at, or None when there is no ``latest``."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def iterations(root: str) -> list[tuple[int, str]]:
    """``(step, folder name)`` of the complete checkpoints in ``root``, oldest step first."""
    found = []
    for name in os.listdir(root):
        m = _ITER.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            found.append((int(m.group(1)), name))
    return sorted(found)


def to_remove(root: str, keep_last: int | None) -> list[str]:
    """Checkpoint folders of the live run beyond its ``keep_last`` newest. The live run is ``latest``
    and what came before it: after a manual rollback the newer folders of the abandoned line are
    neither counted nor removed (a resumed run replaces each when it saves that step again).
    Reads the folder, deletes nothing."""
    if not keep_last or keep_last < 1:
        return []
    found = iterations(root)
    keep = latest_name(root)
    steps = {name: step for step, name in found}
    if keep in steps:
        found = [(step, name) for step, name in found if step <= steps[keep]]
    return [name for _, name in found[:-keep_last] if name != keep]


def set_aside_abandoned(root: str) -> list[str]:
    """Rename checkpoints newer than ``latest`` (a rolled-back run's abandoned line) to
    ``abandoned-iter_...`` so retention never mistakes them for the live run's; returns the new names."""
    keep = latest_name(root)
    steps = {name: step for step, name in iterations(root)}
    if keep not in steps:
        return []
    moved = []
    for name, step in steps.items():
        if step > steps[keep]:
            target = f"abandoned-{name}"
            if os.path.exists(os.path.join(root, target)):
                shutil.rmtree(os.path.join(root, target))
            os.rename(os.path.join(root, name), os.path.join(root, target))
            moved.append(target)
    if moved:
        _fsync_dir(root)
    return sorted(moved)


def prune(root: str, keep_last: int | None) -> list[str]:
    """Remove what ``to_remove`` lists; returns the names removed."""
    old = to_remove(root, keep_last)
    for name in old:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return old


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """Every file and folder under ``path`` on disk before a rename publishes it (torch_dist already
    syncs its shards; config.yaml, tanuki.json, common.pt and copied folders are not)."""
    for folder, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(folder)


def write_latest(root: str, name: str) -> None:
    """Point ``root/latest`` at ``name``: temp file written and fsynced, renamed, folder fsynced."""
    pointer = os.path.join(root, f".{LATEST}.tmp")
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, os.path.join(root, LATEST))
    _fsync_dir(root)


def check_run_folder(root: str, model_preset: str, mode: str) -> None:
    """Refuse to resume (or skip as finished) a run folder whose latest checkpoint was saved by
    another model preset or training mode: a tiny ``LOCAL=1`` run left in the cluster run's folder
    must not become stage 2's starting point. No-op when the folder has no checkpoint yet."""
    if latest_name(root) is None:
        return
    folder = resolve(root)
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"run folder {root}: checkpoint {folder} has no config.yaml, so which model saved it "
                         f"is unknown; use another checkpoint.dir (RUN=...) or remove the folder")
    with open(path, encoding="utf-8") as f:
        saved = yaml.safe_load(f) or {}
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(saved).__name__}")
    s_preset = (saved.get("model") or {}).get("preset")
    s_mode = (saved.get("train") or {}).get("mode")
    if (s_preset, s_mode) != (model_preset, mode):
        raise ValueError(f"run folder {root} holds a checkpoint of model.preset={s_preset} train.mode={s_mode} "
                         f"({path}), but this run asks for model.preset={model_preset} train.mode={mode}: "
                         f"refusing to resume or skip it; use another checkpoint.dir (RUN=...) or remove the folder")


def _unwrap(chunk):
    """The model inside megatron-core's DDP (whose state dict keys gain a ``module.`` level)."""
    return getattr(chunk, "module", chunk)


def model_state(chunks) -> dict:
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def save_sharded(state: dict, path: str) -> None:
    """megatron-core's torch_dist save, synchronous (collective). Its writer collects the write results
    through a multiprocessing Manager queue made once per process: a server process started by spawn
    (~2-3 s before a process's first save, and one more process that can outlive a rank stopped early).
    A synchronous save writes and collects in this process, so a thread queue serves, for the length
    of the save."""
    import queue

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        dist_checkpointing.save(state, path, async_sharded_save=False)
    finally:  # an asynchronous save (another process writes) would need megatron-core's own again
        filesystem_async._results_queue = previous


def save(root: str, step: int, chunks, optimizer, scheduler, common: dict, side: dict, keep_last: int | None,
         async_save: bool = False) -> str:
    """Collective: every rank calls it. ``side``: {file name: text} and {"copy": [dirs]} for rank 0."""
    import torch.distributed as dist

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
    save_sharded(state, tmp)  # async_save is accepted for forward compatibility; the write is synchronous
    dist.barrier()
    if rank == 0:
        for fname, text in side.get("files", {}).items():
            with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                f.write(text)
        for src in side.get("copy", []):
            shutil.copytree(src, os.path.join(tmp, os.path.basename(src.rstrip("/"))))
        _fsync_tree(tmp)
        set_aside_abandoned(root)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        write_latest(root, name)
        prune(root, keep_last)
    dist.barrier()
    return final


def load_training_state(ckpt: str, chunks, optimizer, scheduler, common_keys) -> dict:
    """Model, optimizer, scheduler and the ``common_keys`` entries, from a training checkpoint."""
    from megatron.core import dist_checkpointing

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
    from megatron.core import dist_checkpointing

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


def main(argv: list[str]) -> int:
    """``check RUN_DIR PRESET MODE`` or ``check-config RUN_DIR CONFIG.yaml [key=value ...]`` (the
    preset and mode resolved as `tanuki train` would): exit 1 with the reason when they differ."""
    usage = ("usage: python -m megatron_tanuki.train.checkpoint check RUN_DIR PRESET MODE\n"
             "       python -m megatron_tanuki.train.checkpoint check-config RUN_DIR CONFIG.yaml [key=value ...]")
    try:
        if len(argv) == 4 and argv[0] == "check":
            check_run_folder(argv[1], argv[2], argv[3])
        elif len(argv) >= 3 and argv[0] == "check-config":
            from megatron_tanuki.train.config import load

            cfg = load(argv[2], argv[3:])
            check_run_folder(argv[1], cfg.model.preset, cfg.train.mode)
        else:
            print(usage, file=sys.stderr)
            return 2
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
