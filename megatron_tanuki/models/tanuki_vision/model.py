"""Tanuki-vision as one megatron-core module: frozen SigLIP tower with S2, projector, Tanuki GPTModel.

Image placeholders are expanded *before* the model (data side): each ``<image>`` becomes
``num_image_tokens`` copies of IMAGE_TOKEN_ID (-200) with labels ignored, so sequence lengths are
fixed for pipeline parallelism. On the first pipeline stage the model embeds the text (placeholders
read as id 0), computes image features, and writes them over the placeholder positions, image after
image in reading order; later stages only run the language model.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_tanuki.data.templates import (  # noqa: F401 (re-exported: expand_image_tokens lives in data/)
    IGNORE_INDEX, IMAGE_TOKEN_ID, expand_image_tokens)
from megatron_tanuki.models.tanuki.config import TanukiConfig
from megatron_tanuki.models.vision.s2 import S2Geometry, s2_features
from megatron_tanuki.models.vision.siglip import SiglipConfig


@dataclass(frozen=True)
class TanukiVisionConfig:
    """``s2_scales`` as in LLaVA-JP's config.json ((1.0,) = ``scales: null``). Every S2 number (input
    size, token grid, tower runs) comes from :attr:`s2`; ``s2_grid`` is filled in from it and, when
    given (a checkpoint's tanuki.json), must agree with it."""

    name: str
    llm: TanukiConfig
    vision: SiglipConfig
    s2_scales: tuple[float, ...] = (1.0, 0.5)
    s2_grid: tuple[int, int] | None = None  # derived: how the tower's tokens are laid out (728 = 26 x 28)

    def __post_init__(self):
        object.__setattr__(self, "s2_scales", tuple(float(s) for s in self.s2_scales))
        grid = self.s2.grid  # raises S2GeometryError for a geometry LLaVA-JP cannot run
        if self.s2_grid is not None and tuple(self.s2_grid) != grid:
            raise ValueError(f"{self.name}: s2_grid {list(self.s2_grid)} disagrees with the {grid[0]} x {grid[1]} "
                             f"grid derived from the tower ({self.vision.num_features} tokens per tile)")
        object.__setattr__(self, "s2_grid", grid)

    @property
    def s2(self) -> S2Geometry:
        return S2Geometry.for_tower(self.vision.image_size, self.vision.num_features, self.s2_scales)

    @property
    def image_size(self) -> int:
        """Input resolution, as LLaVA-JP sets it: the tower's tile times the number of scales."""
        return self.s2.input_size

    @property
    def num_image_tokens(self) -> int:
        return self.s2.output_tokens

    @property
    def projector_input_size(self) -> int:
        return self.vision.hidden_size * len(self.s2_scales)

    @property
    def is_moe(self) -> bool:
        return self.llm.is_moe

    def replace(self, **changes) -> "TanukiVisionConfig":
        changes.setdefault("s2_grid", None)  # re-derived for the new tower / scales
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {"kind": "tanuki-vision", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "TanukiVisionConfig":
        d = {k: v for k, v in d.items() if k != "kind"}
        return cls(name=d["name"], llm=TanukiConfig(**d["llm"]), vision=SiglipConfig(**d["vision"]),
                   s2_scales=tuple(d["s2_scales"]), s2_grid=tuple(d["s2_grid"]) if d.get("s2_grid") else None)


def projector_parameter_count(cfg: TanukiVisionConfig) -> int:
    h = cfg.llm.hidden_size
    return cfg.projector_input_size * h + h + h * h + h


class TanukiVisionModel(MegatronModule):
    """Vision tower (frozen) + projector on the first pipeline stage; the language model throughout."""

    def __init__(self, cfg: TanukiVisionConfig, language_model, vision_tower=None, projector=None):
        super().__init__(config=language_model.config)
        self.cfg = cfg
        self.model_type = language_model.model_type  # read by megatron-core's schedules
        self.language_model = language_model
        self.pre_process = language_model.pre_process
        self.vision_model = vision_tower
        self.vision_projection = projector
        if vision_tower is not None:
            vision_tower.requires_grad_(False)
        # With sequence parallelism the embedding would scatter the sequence before the image
        # features are written; we scatter ourselves afterwards.
        self.sequence_parallel = language_model.config.sequence_parallel
        if self.pre_process and self.sequence_parallel:
            emb = language_model.embedding
            emb.scatter_to_sequence_parallel = False
            emb.reduce_scatter_embeddings = emb.word_embeddings.reduce_scatter_embeddings = False

    # megatron-core's finalize_model_grads looks for the module with ``pre_process`` (this one) and
    # asks it about tied embeddings on the first/last pipeline stages (PP > 1): answer for the LLM.
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    @property
    def post_process(self) -> bool:
        return self.language_model.post_process

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def set_trainable(self, projector: bool, language_model: bool) -> None:
        """Stage 1: projector only; stage 2: projector + LLM. The vision tower is always frozen."""
        if self.vision_projection is not None:
            self.vision_projection.requires_grad_(projector)
        self.language_model.requires_grad_(language_model)
        if self.vision_model is not None:
            self.vision_model.requires_grad_(False)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] normalized pixels -> [n, num_image_tokens, hidden]."""
        cache = getattr(self, "_feature_cache", None)
        if cache is not None and cache[0] is images:
            return cache[1]
        with torch.no_grad():
            feats = s2_features(self.vision_model, images, self.cfg.s2)
        out = self.vision_projection(feats)
        if cache is not None:
            self._feature_cache = (images, out)
        return out

    @contextlib.contextmanager
    def reusing_image_features(self):
        """Inside the block, the features of the *same* images tensor are computed once: decoding
        without a KV cache re-runs the prompt with the same images at every new token (no_grad use
        only -- the projector's graph is not kept)."""
        self._feature_cache = (None, None)
        try:
            yield
        finally:
            self._feature_cache = None

    def forward(self, input_ids, position_ids, attention_mask, images=None, labels=None, **kwargs):
        decoder_input = None
        if self.pre_process:
            is_image = input_ids == IMAGE_TOKEN_ID
            text = self.language_model.embedding(input_ids=input_ids.masked_fill(is_image, 0),
                                                 position_ids=position_ids)  # [s, b, h]
            n_placeholders = int(is_image.sum())
            if n_placeholders:
                if images is None:
                    raise ValueError(f"{n_placeholders} image positions in the batch but no images")
                feats = self.image_features(images).to(text.dtype)
                if feats.shape[0] * feats.shape[1] != n_placeholders:
                    raise ValueError(f"{n_placeholders} image positions for {feats.shape[0]} images of "
                                     f"{feats.shape[1]} tokens")
                bsh = text.transpose(0, 1).clone()
                bsh[is_image] = feats.reshape(-1, feats.shape[-1])
                text = bsh.transpose(0, 1).contiguous()
            elif self.training and torch.is_grad_enabled() and self.vision_projection is not None:
                # A micro-batch without images still touches the trainable projector (a zero gradient):
                # megatron's overlapped gradient reduction starts a bucket only once every parameter in
                # it has a gradient from the step's last micro-batch, and would otherwise fail.
                touched = [p.sum() for p in self.vision_projection.parameters() if p.requires_grad]
                if touched:
                    text = text + 0.0 * torch.stack(touched).sum().to(text.dtype)
            if self.sequence_parallel:
                from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

                text = scatter_to_sequence_parallel_region(text)
            decoder_input = text
        return self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                                   labels=labels, **kwargs)
