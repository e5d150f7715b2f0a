"""What a conversion reads: an HF folder, and for Tanuki-vision possibly a separate SigLIP folder.

``open_source`` reads config.json, decides the architecture (a language model the registry knows by
its model_type -- Tanuki, Nemotron-4 -- or LLaVA-JP Tanuki-vision)
and returns the config together with one source object whose tensor names are the LLaVA-JP names
whatever the folder layout, so the mapping tables see one naming.
"""
from __future__ import annotations

import os

import torch

from megatron_tanuki.convert.safetensors_io import CheckpointError, HFCheckpoint


_TOWER_PARTS = ("embeddings.", "encoder.", "post_layernorm.", "head.")


def _vision_model_name(name: str) -> str | None:
    """A SigLIP file's tensor name in transformers-4 form (``vision_model.*``), or None if not the tower.

    Hub SigLIP files and LLaVA-JP use ``vision_model.*``; transformers 5 saves a SiglipVisionModel
    without that prefix. Both are accepted.
    """
    if name.startswith("vision_model."):
        return name
    return "vision_model." + name if name.startswith(_TOWER_PARTS) else None


class WithVisionFolder:
    """A LLaVA-JP folder without its tower + a SigLIP folder, seen as one embedded checkpoint.

    SigLIP's ``vision_model.*`` tensors appear under the LLaVA-JP tower prefix; a full SiglipModel
    folder's text tower (``text_model.*``, ``logit_*``) is not part of the VLM and is skipped. If
    the tower's dtype differs from the language model's (a fp32 hub SigLIP beside a bf16 LLM), it is
    cast to the language model's dtype, as LLaVA-JP does when it loads the tower for training.
    """

    def __init__(self, main: HFCheckpoint, vision: HFCheckpoint, prefix: str):
        self.main, self.vision = main, vision
        self.path, self.config = main.path, main.config
        inside = [n for n in main.names() if n.startswith(prefix)]
        if inside:
            raise CheckpointError(f"{main.path} already holds the vision tower ({inside[0]}); "
                                  f"do not also pass --vision {vision.path}")
        self.tower = {prefix + _vision_model_name(n): n for n in vision.names() if _vision_model_name(n)}
        if not self.tower:
            raise CheckpointError(f"--vision {vision.path}: no vision_model.* tensors (not a SigLIP checkpoint)")
        self.shard_of = {**main.shard_of, **{n: f"{vision.path}/{vision.shard_of[v]}" for n, v in self.tower.items()}}
        dtypes = {main.dtype(n) for n in main.names()}
        self.target = dtypes.pop() if len(dtypes) == 1 else None

    def names(self) -> list[str]:
        return self.main.names() + list(self.tower)

    def shape(self, name):
        return self.vision.shape(self.tower[name]) if name in self.tower else self.main.shape(name)

    def dtype(self, name):
        if name in self.tower:
            return self.target or self.vision.dtype(self.tower[name])
        return self.main.dtype(name)

    def nbytes(self, name):
        if name in self.tower:
            return torch.Size(self.shape(name)).numel() * torch.empty((), dtype=self.dtype(name)).element_size()
        return self.main.nbytes(name)

    def get(self, name):
        if name not in self.tower:
            return self.main.get(name)
        t = self.vision.get(self.tower[name])
        return t.to(self.dtype(name))

    def side_files(self) -> list[str]:
        return self.main.side_files()


def open_source(hf_dir: str, vision_dir: str | None = None):
    """(config, source): the architecture's config (registry.from_hf_config, or Tanuki-vision for a
    LLaVA-JP folder), and the tensors to convert."""
    from megatron_tanuki.models.registry import from_hf_config
    from megatron_tanuki.models.tanuki_vision.hf_config import from_llava_jp_config, is_llava_jp
    from megatron_tanuki.models.tanuki_vision.hf_map import TOWER_PREFIX

    src = HFCheckpoint(hf_dir)
    where = os.path.join(src.path, "config.json")
    if not is_llava_jp(src.config):
        if vision_dir:
            raise CheckpointError(f"--vision given, but {where} is not a LLaVA-JP (vision) checkpoint")
        return from_hf_config(src.config, where), src
    cfg = from_llava_jp_config(src.config, where, vision_dir)
    if vision_dir:
        return cfg, WithVisionFolder(src, HFCheckpoint(vision_dir), TOWER_PREFIX)
    if not any(n.startswith(TOWER_PREFIX) for n in src.names()):
        tower = src.config.get("mm_vision_tower")
        if tower and os.path.isdir(tower) and any(f.endswith(".safetensors") for f in os.listdir(tower)):
            return cfg, WithVisionFolder(src, HFCheckpoint(tower), TOWER_PREFIX)
        raise CheckpointError(f"{src.path}: no vision tower tensors ({TOWER_PREFIX}*) and mm_vision_tower = "
                              f"{tower!r} is not a local SigLIP folder; give it with --vision DIR")
    return cfg, src
