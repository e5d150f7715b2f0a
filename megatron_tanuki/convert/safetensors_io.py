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

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and tensor."""


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
_ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}
# Other weight formats beside the safetensors: never copied along as "side files".
_STALE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".safetensors", ".bin.index.json", ".gguf")


def read_bytes(path: str, start: int, nbytes: int, short: str) -> torch.Tensor:
    """``nbytes`` bytes of ``path`` from ``start`` as a uint8 tensor in torch-owned memory (the conversion
    writer can free it once written). A read loop: one read() returns at most ~2 GiB on Linux (Nemotron-4-340B's
    embedding is 9.4 GB). ``short``: the CheckpointError text when the file ends first."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    view, got = memoryview(buf.numpy()), 0
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise CheckpointError(short)
            got += n
    return buf


def read_header(path: str) -> dict:
    """The safetensors header of ``path``, checked against the file's size.

    Each entry gains ``"start"``: the absolute byte offset of its data in the file.
    """
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
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}, "
                                  f"supported: {sorted(_DTYPES)}")
        a, b = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if b - a != numel * _ITEMSIZE[info["dtype"]]:
            raise CheckpointError(f"{path}: tensor {name} spans {b - a} bytes, its shape {info['shape']} "
                                  f"and dtype {info['dtype']} need {numel * _ITEMSIZE[info['dtype']]}")
        info["start"] = 8 + n + a
        end = 8 + n + b
        if end > size:
            raise CheckpointError(
                f"truncated safetensors file: {path}: tensor {name} ends at byte {end}, file has {size}")
    return header


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


class HFCheckpoint:
    """A HF model folder: config.json plus one or more safetensors shards."""

    def __init__(self, path: str, require_config: bool = True):
        self.path = os.path.abspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"not a folder: {self.path}")
        cfg_path = os.path.join(self.path, "config.json")
        self.config = {}
        if os.path.isfile(cfg_path):
            self.config = _read_json(cfg_path)
        elif require_config:
            raise CheckpointError(f"missing config.json in {self.path}")
        self.shard_of: dict[str, str] = {}
        index = os.path.join(self.path, INDEX)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
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
        """One tensor, read with a plain seek + read (no mmap: the process keeps only this tensor)."""
        if name not in self.shard_of:
            raise CheckpointError(f"tensor {name} not found in {self.path}")
        shard = self.shard_of[name]
        info = self.headers[shard][name]
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        buf = read_bytes(os.path.join(self.path, shard), info["start"], nbytes,
                         f"truncated safetensors file: {self.path}/{shard} while reading {name}")
        return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])

    def side_files(self) -> list[str]:
        """Files that are not weights (tokenizer, generation config, ...), passed through."""
        weights = set(self.headers) | {INDEX}
        return sorted(f for f in os.listdir(self.path)
                      if os.path.isfile(os.path.join(self.path, f)) and f not in weights
                      and not f.endswith(_STALE_WEIGHTS))


_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}


class ShardedWriter:
    """Streams tensors into safetensors shards (~max_shard_bytes each) plus the HF index.

    The names, shapes and dtypes are known before any data (``plan``), so each shard's header is
    written first and tensor bytes are appended as they arrive: one tensor in memory at a time.
    Tensors must arrive in plan order.
    """

    def __init__(self, folder: str, plan: list[tuple[str, tuple, torch.dtype]],
                 max_shard_bytes: int = 5 * 2**30):
        self.folder = folder
        self.shards: list[list[tuple[str, tuple, torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            if self.shards[-1] and size + n > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dtype, n))
            size += n
        self.total = sum(n for shard in self.shards for *_, n in shard)
        self.files = [SINGLE] if len(self.shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors" for i in range(len(self.shards))]
        self.order = [(i, item) for i, shard in enumerate(self.shards) for item in shard]
        self.pos = 0
        self.handle = None
        self.shard = -1

    def _open(self, i: int) -> None:
        if self.handle:
            self.handle.close()
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, n in self.shards[i]:
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.handle = open(os.path.join(self.folder, self.files[i]), "wb")
        self.handle.write(struct.pack("<Q", len(raw)) + raw)
        self.shard = i

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.pos >= len(self.order):
            raise ValueError(f"tensor {name} is not in the write plan")
        i, (want, shape, dtype, n) = self.order[self.pos]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"expected {want} {list(shape)} {dtype}, got {name} {list(tensor.shape)} {tensor.dtype}")
        if i != self.shard:
            self._open(i)
        self.handle.write(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
        self.pos += 1

    def abort(self) -> None:
        if self.handle:
            self.handle.close()
            self.handle = None

    def close(self) -> None:
        if self.pos != len(self.order):
            raise ValueError(f"write plan not finished: {self.order[self.pos][1][0]} and "
                             f"{len(self.order) - self.pos - 1} more tensors were never written")
        if self.handle:
            self.handle.close()
        if len(self.shards) > 1:
            weight_map = {name: self.files[i] for i, (name, *_rest) in self.order}
            with open(os.path.join(self.folder, INDEX), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
