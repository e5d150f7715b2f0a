"""An unpacked ``.nemo`` folder whose weights are a megatron-core zarr checkpoint, read as a conversion source.

NVIDIA's Nemotron-4 releases store one Zarr-v2 array per tensor, uncompressed, one chunk file per
(layer, TP shard). zarr itself is not used: 3.x cannot read their non-standard ``"bfloat16"`` dtype and
2.x needs ml_dtypes; the chunk files are raw C-order arrays, so they are read directly, one file at a
time, into a preallocated tensor -- a stacked array is only ever read one layer slice at a time.
"""
from __future__ import annotations

import itertools
import json
import math
import os

import torch
import yaml

from megatron_tanuki.convert.safetensors_io import CheckpointError, read_bytes

CONFIG = "model_config.yaml"
WEIGHTS = "model_weights"
STACKED = "model.decoder.layers."
_DTYPES = {"bfloat16": torch.bfloat16, "<f2": torch.float16, "<f4": torch.float32, "<f8": torch.float64}


class ZarrArray:
    """One Zarr-v2 array folder: its ``.zarray`` validated, its chunks read on demand."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.key = os.path.basename(self.path)
        meta_path = os.path.join(self.path, ".zarray")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: not a zarr array (no .zarray)") from None
        except ValueError as e:
            raise CheckpointError(f"{meta_path}: invalid JSON: {e}") from None
        expect = {"zarr_format": 2, "order": "C", "compressor": None, "filters": None}
        for field, want in expect.items():
            if meta.get(field) != want:
                raise CheckpointError(f"{meta_path}: {field} is {meta.get(field)!r}, only {want!r} is "
                                      f"supported (uncompressed Zarr-v2 C-order chunks)")
        self.sep = meta.get("dimension_separator", ".")
        if self.sep not in (".", "/"):
            raise CheckpointError(f"{meta_path}: dimension_separator {self.sep!r} is not '.' or '/'")
        if meta.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{self.path}: dtype {meta.get('dtype')!r} is not a weight dtype "
                                  f"(supported: {sorted(_DTYPES)})")
        self.dtype = _DTYPES[meta["dtype"]]
        self.shape, self.chunks = tuple(meta.get("shape", ())), tuple(meta.get("chunks", ()))
        if len(self.shape) != len(self.chunks) or min(self.chunks, default=1) < 1 or min(self.shape, default=0) < 0:
            raise CheckpointError(f"{meta_path}: shape {list(self.shape)} and chunks {list(self.chunks)} disagree")
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()

    def read(self, index_of_axis0: int | None = None) -> torch.Tensor:
        """The whole array, or (index given) its slice ``[index]`` along axis 0, shape ``shape[1:]``."""
        lo, hi = (0, self.shape[0] if self.shape else 1)
        if index_of_axis0 is not None:
            lo, hi = index_of_axis0, index_of_axis0 + 1
        if index_of_axis0 is not None and not (self.shape and 0 <= lo < self.shape[0]):
            raise CheckpointError(f"{self.path}: index {index_of_axis0} outside axis 0 of shape {list(self.shape)}")
        out_shape = ((hi - lo,) + self.shape[1:]) if self.shape else ()
        out = torch.empty(out_shape, dtype=self.dtype)
        if out.numel() == 0:
            return out[0] if index_of_axis0 is not None else out
        grids = [range(lo // self.chunks[0], (hi - 1) // self.chunks[0] + 1)] if self.shape else []
        grids += [range(math.ceil(s / c)) for s, c in zip(self.shape[1:], self.chunks[1:])]
        for grid in itertools.product(*grids):
            chunk = self._chunk(grid)
            src, dst = [], []
            for axis, (g, c, s) in enumerate(zip(grid, self.chunks, self.shape)):
                a, b = max(g * c, lo if axis == 0 else 0), min(g * c + c, hi if axis == 0 else s)
                src.append(slice(a - g * c, b - g * c))
                dst.append(slice(a - lo, b - lo) if axis == 0 else slice(a, b))
            out[tuple(dst)] = chunk[tuple(src)]
        return out[0] if index_of_axis0 is not None else out

    def check_chunks(self) -> None:
        """Every chunk file present with its full size (stat only): a corrupt checkpoint is named
        before any output is written, not midway through a conversion."""
        for grid in itertools.product(*[range(math.ceil(s / c)) for s, c in zip(self.shape, self.chunks)]):
            self._chunk_file(grid)

    def _chunk_file(self, grid) -> tuple[str, str, int]:
        """(path, name, bytes) of the chunk at ``grid``, checked present and full-size (zarr writes edge
        chunks whole)."""
        name = self.sep.join(map(str, grid)) if grid else "0"
        path, want = os.path.join(self.path, *name.split("/")), math.prod(self.chunks) * self.itemsize
        where = f"{os.path.dirname(self.path)}: tensor {self.key} chunk {name}"
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise CheckpointError(f"{where} is missing") from None
        if size != want:
            raise CheckpointError(f"{where} has {size} bytes, expected {want}")
        return path, where, want

    def _chunk(self, grid) -> torch.Tensor:
        path, where, want = self._chunk_file(grid)
        return read_bytes(path, 0, want, f"{where} ended early").view(self.dtype).reshape(self.chunks)


class NemoCheckpoint:
    """An unpacked ``.nemo`` folder as a source: per-layer tensor names, one layer slice read at a time.

    Names drop the ``model.`` prefix; a stacked key ``model.decoder.layers.X`` becomes
    ``decoder.layers.{i}.X``. Order: embedding, then the layers in order, then the rest.
    """

    def __init__(self, folder: str):
        self.path = os.path.abspath(folder)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"not a folder: {self.path}")
        self.config = None  # set by the caller (the architecture's config from self.yaml)
        cfg_path = os.path.join(self.path, CONFIG)
        try:
            with open(cfg_path, encoding="utf-8") as f:
                self.yaml = yaml.safe_load(f)
        except FileNotFoundError:
            raise CheckpointError(f"missing {CONFIG} in {self.path} (not an unpacked .nemo folder)") from None
        except yaml.YAMLError as e:
            raise CheckpointError(f"{cfg_path}: invalid YAML: {e}") from None
        if not isinstance(self.yaml, dict):
            raise CheckpointError(f"{cfg_path}: not a YAML mapping")
        self.weights_dir = os.path.join(self.path, WEIGHTS)
        meta_path = os.path.join(self.weights_dir, "metadata.json")
        try:
            with open(meta_path, encoding="utf-8") as f:
                backend = json.load(f).get("sharded_backend")
        except FileNotFoundError:
            raise CheckpointError(f"missing {WEIGHTS}/metadata.json in {self.path}") from None
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{meta_path}: not a distributed checkpoint metadata file ({e})") from None
        if backend == "torch_dist":
            raise CheckpointError(f"{meta_path}: sharded_backend is 'torch_dist', not 'zarr': this reads NeMo zarr "
                                  f"checkpoints only (torch_dist is megatron-core's own format)")
        if backend != "zarr":
            raise CheckpointError(f"{meta_path}: sharded_backend is {backend!r}, expected 'zarr'")
        layers = self.yaml.get("num_layers")
        if not isinstance(layers, int) or layers < 1:
            raise CheckpointError(f"{cfg_path}: num_layers is {layers!r}, expected a positive integer")
        self._arrays: dict[str, tuple[ZarrArray, int | None]] = {}
        first, stacked, rest = [], [], []
        for key in sorted(os.listdir(self.weights_dir)):
            if not os.path.isdir(os.path.join(self.weights_dir, key)) or key.endswith("._extra_state"):
                continue
            if not key.startswith("model."):
                raise CheckpointError(f"{self.weights_dir}: tensor {key} does not start with 'model.'")
            arr = ZarrArray(os.path.join(self.weights_dir, key))
            if key.startswith(STACKED):
                if not arr.shape or arr.shape[0] != layers:
                    raise CheckpointError(f"{self.weights_dir}: tensor {key} stacks {arr.shape[0] if arr.shape else 0} "
                                          f"layers on axis 0 (shape {list(arr.shape)}), but {cfg_path} says "
                                          f"num_layers: {layers}")
                if arr.chunks[0] != 1:  # one layer per chunk, or a layer read would load several
                    raise CheckpointError(f"{self.weights_dir}: tensor {key} has chunks {list(arr.chunks)}; "
                                          f"a stacked tensor must hold one layer per chunk (chunk size 1 on axis 0)")
                stacked.append((key[len(STACKED):], arr))
            else:
                name = key[len("model."):]
                (first if name.startswith("embedding.") else rest).append(name)
                self._arrays[name] = (arr, None)
        order = first + [f"decoder.layers.{i}.{x}" for i in range(layers) for x, _ in stacked] + rest
        for i in range(layers):
            for x, arr in stacked:
                self._arrays[f"decoder.layers.{i}.{x}"] = (arr, i)
        self._arrays = {n: self._arrays[n] for n in order}
        # name -> array folder relative to path (for error messages)
        self.shard_of: dict[str, str] = {n: os.path.join(WEIGHTS, a.key) for n, (a, _) in self._arrays.items()}

    def _entry(self, name: str) -> tuple[ZarrArray, int | None]:
        if name not in self._arrays:
            raise CheckpointError(f"tensor {name} not found in {self.path}")
        return self._arrays[name]

    def names(self) -> list[str]:
        return list(self._arrays)

    def check_chunks(self) -> None:
        """All chunk files of all arrays present and full-size (see ZarrArray.check_chunks)."""
        for arr in {id(a): a for a, _ in self._arrays.values()}.values():
            arr.check_chunks()

    def shape(self, name: str) -> tuple[int, ...]:
        arr, layer = self._entry(name)
        return arr.shape[1:] if layer is not None else arr.shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0].dtype

    def nbytes(self, name: str) -> int:
        return math.prod(self.shape(name)) * self._entry(name)[0].itemsize

    def get(self, name: str) -> torch.Tensor:
        arr, layer = self._entry(name)
        return arr.read(layer)

    def tokenizer_file(self) -> str | None:
        """Absolute path of the tokenizer: the yaml's ``tokenizer.model`` (``nemo:`` stripped) if it is in the
        folder, else the folder's only ``*.model`` file, else None."""
        tok = self.yaml.get("tokenizer")
        named = tok.get("model") if isinstance(tok, dict) else None
        if isinstance(named, str) and named:
            base = os.path.basename(named.removeprefix("nemo:"))
            if os.path.isfile(os.path.join(self.path, base)):
                return os.path.join(self.path, base)
        models = [os.path.join(self.path, f) for f in os.listdir(self.path) if f.endswith(".model")]
        models = [f for f in models if os.path.isfile(f)]
        return models[0] if len(models) == 1 else None

    def side_files(self) -> list[str]:
        tok = self.tokenizer_file()
        return [os.path.relpath(tok, self.path)] if tok else []
