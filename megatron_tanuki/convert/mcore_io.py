"""megatron-core ``torch_dist`` checkpoints, written and read one tensor at a time.

Why not ``dist_checkpointing.save``: it needs the whole state dict in memory (94 GB for
Tanuki-8x8B). We let megatron-core itself describe the checkpoint -- build the model on the meta
device in one process (TP=PP=EP=1), take its ``sharded_state_dict()``, apply its factories -- and
hand that to PyTorch DCP with a planner whose ``resolve_data`` produces each chunk only when the
writer asks for it. The files are what megatron-core writes itself (same keys, chunks, objects,
``common_state`` and ``metadata.json``), so the checkpoint loads under any TP/PP/EP layout.

Reading goes the other way: each parameter of the TP=1 model is assembled from whatever chunks
the checkpoint holds (one chunk per layer and expert when we wrote it; smaller TP/EP pieces when a
training run wrote it).
"""
from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.planner import WriteItemType


@dataclass(frozen=True)
class Piece:
    """One checkpoint chunk of one model parameter, and where it sits inside that parameter."""

    key: str  # sharded key in the checkpoint
    offsets: tuple[int, ...]  # chunk offset in the global tensor (prepended axes included)
    sizes: tuple[int, ...]  # chunk sizes (prepended axes included)
    view: tuple  # (shape, stride, storage_offset) of the chunk inside the parameter


def _flat_items(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat_items(v, prefix + (k,))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                yield prefix + (k, i), x
        else:
            yield prefix + (k,), v


def model_layout(cfg, dtype: torch.dtype):
    """(sharded_state_dict with factories applied, {param name: [Piece]}) of a meta TP=1 model."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from megatron_tanuki.models import registry
    from megatron_tanuki.models.checkpoint_meta import DTYPE_NAMES

    model = registry.meta_model(cfg, DTYPE_NAMES[dtype])
    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    pieces: dict[str, list[Piece]] = {}
    for path, sh in _flat_items(sharded):
        if not isinstance(sh, ShardedTensor):
            continue
        d = sh.data
        sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
        pieces.setdefault(path[0], []).append(
            Piece(sh.key, tuple(sh.global_offset), sizes, (tuple(d.shape), d.stride(), d.storage_offset())))
    params = dict(model.named_parameters())
    return sharded, pieces, {n: tuple(p.shape) for n, p in params.items()}


class _StreamingPlanner:
    """Mixin over megatron-core's save planner: tensor data comes from ``fetch`` on demand."""

    def __init__(self, by_chunk: dict, fetch: Callable[[str], torch.Tensor], cache_size: int = 1, **kw):
        super().__init__(**kw)
        self.by_chunk, self.fetch = by_chunk, fetch
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size
        self._handed: list[torch.Tensor] = []

    def _release(self) -> None:
        """Free the pieces already written. torch's filesystem writer keeps each key's last written
        tensor (its ``tensor_dict``, needed only for safetensors output) until the file is closed, so
        without this the last layer's piece of every stacked key, plus the embedding, stay in memory to
        the end (27 GB for Nemotron-4-340B). The serial loader (``per_thread_copy_ahead=0``) has written
        every piece handed out before it asks for the next, so storages not shared with a cached
        parameter are emptied in place; a non-resizable storage (a view of a read buffer) is left."""
        live = {t.untyped_storage().data_ptr() for t in self.cache.values()}
        keep = []
        for t in self._handed:
            storage = t.untyped_storage()
            if storage.data_ptr() in live:
                keep.append(t)
            elif storage.resizable():
                storage.resize_(0)
        self._handed = keep

    def _param(self, name: str) -> torch.Tensor:
        if name not in self.cache:
            self.cache[name] = self.fetch(name)
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return self.cache[name]

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        key = (write_item.index.fqn, tuple(write_item.index.offset))
        name, piece = self.by_chunk[key]
        self._release()
        t = self._param(name)
        self._release()  # what this fetch evicted from the cache
        shape, stride, offset = piece.view
        out = t.as_strided(shape, stride, offset).reshape(piece.sizes).contiguous()
        if out.untyped_storage().nbytes() != out.nbytes:
            out = out.clone()  # the writer would copy a part of a larger storage itself, out of our sight
        self._handed.append(out)
        return out


def write_checkpoint(out_dir: str, cfg, dtype: torch.dtype, fetch: Callable[[str], torch.Tensor],
                     common: dict | None = None) -> None:
    """Write a torch_dist checkpoint of ``cfg`` whose parameters come from ``fetch(param_name)``.

    ``fetch`` must return a tensor nobody else keeps (a fresh read or a computed one): the writer frees
    its memory once its pieces are written (see _StreamingPlanner._release)."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    sharded, pieces, _ = model_layout(cfg, dtype)
    sharded["common_state"] = ShardedObject("common_state", common or {}, (1,), (0,), replica_id=0)
    by_chunk = {(p.key, p.offsets): (name, p) for name, ps in pieces.items() for p in ps}
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    pyt_state = mcore_to_pyt_state_dict(flat, is_loading=False)

    class Planner(_StreamingPlanner, MCoreSavePlanner):
        pass

    # per_thread_copy_ahead=0: the serial loader (each piece written before the next is asked for), which
    # _StreamingPlanner._release relies on; the overlapping one would also read ahead of the writes
    writer = FileSystemWriter(out_dir, single_file_per_rank=True, thread_count=1, per_thread_copy_ahead=0)
    dcp.save(pyt_state, storage_writer=writer,
             planner=Planner(by_chunk, fetch, flatten_state_dict=False), no_dist=True)
    save_config(CheckpointingConfig("torch_dist", 1), out_dir)


class CheckpointReader:
    """Reads regions of a torch_dist checkpoint's tensors, chunk by chunk."""

    def __init__(self, ckpt_dir: str):
        from megatron_tanuki.convert.safetensors_io import CheckpointError

        meta_json = os.path.join(ckpt_dir, "metadata.json")
        if not os.path.isfile(meta_json):
            raise CheckpointError(f"not a megatron-core dist checkpoint: {ckpt_dir} (no metadata.json)")
        with open(meta_json) as f:
            backend = json.load(f).get("sharded_backend")
        if backend != "torch_dist":
            raise CheckpointError(f"{meta_json}: sharded_backend {backend!r}, expected 'torch_dist'")
        self.dir = ckpt_dir
        self.meta = FileSystemReader(ckpt_dir).read_metadata()
        self.storage = {(i.fqn, tuple(i.offset) if i.offset is not None else None): s
                        for i, s in self.meta.storage_data.items()}
        self._last = (None, None)

    def _chunk(self, key, offsets) -> torch.Tensor:
        if self._last[0] == (key, offsets):
            return self._last[1]
        info = self.storage[(key, offsets)]
        if getattr(info, "transform_descriptors", None):
            raise NotImplementedError(f"{self.dir}: compressed checkpoint items are not supported ({key})")
        with open(os.path.join(self.dir, info.relative_path), "rb") as f:
            f.seek(info.offset)
            t = torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
        self._last = ((key, offsets), t)
        return t

    def read(self, key: str, offsets, sizes, dtype=None) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of ``key``, assembled from overlapping chunks."""
        if key not in self.meta.state_dict_metadata:
            from megatron_tanuki.convert.safetensors_io import CheckpointError

            raise CheckpointError(f"{self.dir}: checkpoint has no tensor {key}")
        md = self.meta.state_dict_metadata[key]
        out = torch.empty(sizes, dtype=dtype or md.properties.dtype)
        covered = 0
        for ch in md.chunks:
            lo = [max(a, b) for a, b in zip(offsets, ch.offsets)]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offsets, sizes, ch.offsets, ch.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            src = self._chunk(key, tuple(ch.offsets))
            src_idx = tuple(slice(l - c, h - c) for l, h, c in zip(lo, hi, ch.offsets))
            dst_idx = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, offsets))
            out[dst_idx] = src[src_idx]
            n = 1
            for l, h in zip(lo, hi):
                n *= h - l
            covered += n
        if covered != out.numel():
            raise ValueError(f"{self.dir}: {key} region {tuple(offsets)}+{tuple(sizes)} is not fully stored")
        return out

    def read_param(self, pieces: list[Piece], shape, dtype=None) -> torch.Tensor:
        """A whole TP=1 parameter, from its pieces."""
        t = None
        for p in pieces:
            region = self.read(p.key, p.offsets, p.sizes, dtype)
            if t is None:
                t = torch.empty(shape, dtype=region.dtype)
            v_shape, stride, offset = p.view
            t.as_strided(v_shape, stride, offset).copy_(region.reshape(v_shape))
        return t
