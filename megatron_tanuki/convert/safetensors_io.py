"""HF checkpoint folders: validated lazy reading and sharded streaming writing of safetensors.

Reading parses each shard's header first (names, dtypes, shapes, byte ranges) and checks it
against the file size and the index, so a truncated file or a shard missing from disk is reported
with its path before any conversion work; tensors are then read one at a time.
"""
from __future__ import annotations

import json
import os
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and tensor."""


def read_header(path: str) -> dict:
    """The safetensors header of ``path``, checked against the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"truncated safetensors file: {path} ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise CheckpointError(f"truncated safetensors file: {path} (header of {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"corrupt safetensors header in {path}: {e}") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        end = 8 + n + info["data_offsets"][1]
        if end > size:
            raise CheckpointError(
                f"truncated safetensors file: {path}: tensor {name} ends at byte {end}, file has {size}")
    return header


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


class HFCheckpoint:
    """A HF model folder: config.json plus one or more safetensors shards."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"not a folder: {self.path}")
        cfg_path = os.path.join(self.path, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"missing config.json in {self.path}")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                self.config = json.load(f)
        except ValueError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON: {e}") from None
        self.shard_of: dict[str, str] = {}
        index = os.path.join(self.path, INDEX)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(self.path, shard)):
                    names = sorted(n for n, s in weight_map.items() if s == shard)
                    raise CheckpointError(
                        f"shard {shard} named in {index} is missing (it holds {names[0]} and "
                        f"{len(names) - 1} more tensors)")
            shards = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(self.path, SINGLE)):
            shards = [SINGLE]
        else:
            raise CheckpointError(f"no {INDEX} or {SINGLE} in {self.path}")
        self.headers = {}
        for shard in shards:
            header = read_header(os.path.join(self.path, shard))
            self.headers[shard] = header
            for name in header:
                self.shard_of[name] = shard
        if os.path.isfile(index):
            for name, shard in weight_map.items():
                if name not in self.headers[shard]:
                    raise CheckpointError(f"{index} puts tensor {name} in {shard}, which does not contain it")
        self._handles = {}

    def names(self) -> list[str]:
        return list(self.shard_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.shard_of[name]][name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.headers[self.shard_of[name]][name]["dtype"]]

    def nbytes(self, name: str) -> int:
        a, b = self.headers[self.shard_of[name]][name]["data_offsets"]
        return b - a

    def get(self, name: str) -> torch.Tensor:
        if name not in self.shard_of:
            raise CheckpointError(f"tensor {name} not found in {self.path}")
        shard = self.shard_of[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(os.path.join(self.path, shard), framework="pt")
        return self._handles[shard].get_tensor(name)

    def side_files(self) -> list[str]:
        """Files that are not weights (tokenizer, generation config, ...), passed through."""
        weights = set(self.headers) | {INDEX}
        return sorted(f for f in os.listdir(self.path)
                      if os.path.isfile(os.path.join(self.path, f)) and f not in weights
                      and not f.endswith(".safetensors"))


class ShardedWriter:
    """Writes tensors into ~max_shard_bytes safetensors shards plus the HF index, streaming."""

    def __init__(self, folder: str, max_shard_bytes: int = 5 * 2**30):
        self.folder, self.max = folder, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        i = len(self.shards)
        save_file(self.pending, os.path.join(self.folder, f"part-{i:05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.rename(os.path.join(self.folder, "part-00000.safetensors"), os.path.join(self.folder, SINGLE))
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.folder, f"part-{i:05d}.safetensors"), os.path.join(self.folder, final))
            weight_map.update({name: final for name in names})
        with open(os.path.join(self.folder, INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
