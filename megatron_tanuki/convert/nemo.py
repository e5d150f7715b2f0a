"""``tanuki convert nemo-to-mcore``: an unpacked ``.nemo`` folder (NVIDIA's released Nemotron-4) -> torch_dist.

The reader (convert/nemo_zarr.py) presents the zarr checkpoint as a conversion source, one layer
slice at a time; the architecture whose registry record reads NeMo configs (``from_nemo``) gives the
config and the name table (``nemo_rules``); the one streaming engine (convert/engine.py) writes the
checkpoint. The tokenizer is copied beside as ``hf/tokenizer.model`` (what `tanuki generate` and
`tanuki serve` use for this checkpoint by default) and ``hf/config.json`` is the HF config of the
same model, so ``mcore-to-hf`` later writes a folder transformers loads.
"""
from __future__ import annotations

import os

import torch

from megatron_tanuki.convert.engine import ConvertStats, source_to_mcore
from megatron_tanuki.convert.nemo_zarr import CONFIG, NemoCheckpoint
from megatron_tanuki.convert.safetensors_io import CheckpointError
from megatron_tanuki.models import registry

TOKENIZER_NAME = "tokenizer.model"
_PRECISION = {"bf16": torch.bfloat16, "bf16-mixed": torch.bfloat16, "16": torch.float16, "16-mixed": torch.float16,
              "32": torch.float32, "fp32": torch.float32}


class NemoSource(NemoCheckpoint):
    """The NeMo folder with the side files a converted checkpoint keeps (yaml, tokenizer renamed)."""

    def side_files(self):
        tok = self.tokenizer_file()
        return [(CONFIG, CONFIG)] + ([(os.path.relpath(tok, self.path), TOKENIZER_NAME)] if tok else [])


def _nemo_architecture():
    archs = [a for a in registry.ARCHITECTURES if a.from_nemo is not None]
    return archs[0]


def _dtype(y: dict, where: str, override: str | None) -> torch.dtype:
    from megatron_tanuki.models.checkpoint_meta import DTYPES

    if override is not None:
        return DTYPES[override]
    precision = str(y.get("precision", "bf16"))
    if precision not in _PRECISION:
        raise CheckpointError(f"{where}: precision {precision!r} is not one of {', '.join(_PRECISION)}")
    return _PRECISION[precision]


def nemo_to_mcore(nemo_dir: str, out: str, overwrite: bool = False, dtype: str | None = None) -> ConvertStats:
    """Convert; ``dtype`` (fp32 | bf16 | fp16) overrides the yaml's ``precision`` (bf16 for the release)."""
    src = NemoSource(nemo_dir)
    src.check_chunks()
    where = os.path.join(src.path, CONFIG)
    names = set(src.names())
    reward = src.shape("rm_head.weight")[0] if "rm_head.weight" in names else 0
    if "embedding.word_embeddings.weight" not in names:
        raise CheckpointError(f"{src.weights_dir}: tensor model.embedding.word_embeddings.weight is missing")
    vocab_rows = src.shape("embedding.word_embeddings.weight")[0]
    arch = _nemo_architecture()
    cfg = arch.from_nemo(src.yaml, where, vocab_rows, reward)
    cfg = cfg.replace(name=os.path.basename(src.path.rstrip("/")).lower() or cfg.name)
    torch_dtype = _dtype(src.yaml, where, dtype)
    src.config = {**arch.hf_config_out(cfg, vocab_rows), "torch_dtype": str(torch_dtype).removeprefix("torch.")}
    return source_to_mcore(src, out, overwrite, cfg, dtype=torch_dtype,
                           rules=arch.nemo_rules(cfg), config_name=CONFIG)
