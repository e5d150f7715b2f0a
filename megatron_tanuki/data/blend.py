"""Indexed pretraining data: Megatron-LM's blends, read through megatron-core's own GPTDataset.

``data.blend`` is Megatron-LM's ``--data-path``: ``[0.7, data/ja_web, 0.3, data/code]`` (weights and
prefixes) or ``[data/ja_web, data/code]`` (weighted by size). A prefix names ``PREFIX.bin/.idx`` or,
as `tanuki preprocess-data --output-prefix` prints it, ``PREFIX_text_document.bin/.idx``.

Datasets are built by ``BlendedMegatronDatasetBuilder`` with ``GPTDatasetConfig`` set as Megatron-LM's
``pretrain_gpt.py`` sets it for a plain run (no position / attention resets, EOD trained, split
``969,30,1``) and sized by Megatron-LM's formula (train: steps x global batch; valid: eval_iters x
(steps // eval_interval + 1) x global batch; test: eval_iters x global batch): the document, sample and
shuffle indices -- so the samples and their order -- are the ones Megatron-LM builds from the same data,
seed, sequence length, blend, train steps and global batch (and, for the valid split, eval_interval and
eval_iters: without an eval_interval ours sizes it for one final evaluation). Rank 0 builds the index cache, the others read it (megatron's
builder does the barrier).
"""
from __future__ import annotations

import os

SUFFIX = "_text_document"  # Megatron-LM's (and our preprocess-data's) default --json-keys text


class BlendError(ValueError):
    pass


class TokenizerInfo:
    """What GPTDatasetConfig reads from a tokenizer (megatron's MegatronTokenizer surface)."""

    def __init__(self, tok):
        self.vocab_size = tok.vocab_size
        self.eod = tok.eos_id
        self.pad = tok.pad_id
        self.unique_identifiers = {"class": type(tok).__name__, "vocab_size": self.vocab_size, "eod": self.eod,
                                   "pad": self.pad, "path": getattr(tok, "model_file", getattr(tok, "folder", ""))}


def resolve_prefix(prefix: str, field: str) -> str:
    """``PREFIX`` whose ``.bin`` and ``.idx`` exist (``PREFIX_text_document`` accepted too)."""
    for p in (prefix, prefix + SUFFIX):
        if os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx"):
            return p
    raise BlendError(f"{field}: no indexed dataset at {prefix!r}: neither {prefix}.bin/.idx nor "
                     f"{prefix}{SUFFIX}.bin/.idx exist (make one with `tanuki preprocess-data --output-prefix`)")


def parse_blend(items: list, field: str) -> tuple[list[str], list[float] | None]:
    """``[w, prefix, w, prefix, ...]`` or ``[prefix, ...]`` -> (prefixes, weights or None)."""
    if not items:
        raise BlendError(f"{field}: empty blend")
    numbers = [isinstance(x, (int, float)) and not isinstance(x, bool) for x in items]
    if any(numbers):
        if len(items) % 2 or not all(numbers[0::2]) or any(numbers[1::2]):
            raise BlendError(f"{field}: a weighted blend is [weight, prefix, weight, prefix, ...], got {items!r}")
        weights = [float(w) for w in items[0::2]]
        if any(w <= 0 for w in weights):
            raise BlendError(f"{field}: weights must be positive, got {weights}")
        paths = [str(p) for p in items[1::2]]
    else:
        weights, paths = None, [str(p) for p in items]
    return [resolve_prefix(p, field) for p in paths], weights


def sizes(train_steps: int, global_batch: int, eval_iters: int, eval_interval: int | None) -> list[int]:
    """Samples per split, Megatron-LM's formula (train_valid_test_num_samples)."""
    interval = eval_interval or train_steps  # ours evaluates at the end when no interval is set
    return [train_steps * global_batch, eval_iters * (train_steps // interval + 1) * global_batch,
            eval_iters * global_batch]


def gpt_config(tok, seed: int, seq_length: int, blend, valid_blend, split: str, cache_dir: str | None):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    common = dict(random_seed=seed, sequence_length=seq_length, path_to_cache=cache_dir, tokenizer=TokenizerInfo(tok),
                  reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                  create_attention_mask=False, mmap_bin_files=True)
    if valid_blend is not None:  # Megatron-LM's --train-data-path / --valid-data-path
        return GPTDatasetConfig(blend_per_split=[blend, valid_blend, None], **common)
    config = GPTDatasetConfig(blend=blend, split=split, **common)
    # Training never reads the test split: it is not built (its share still counts, so the train and
    # valid documents are the ones Megatron-LM's split gives; a tiny test share can hold no document,
    # on which megatron's sample-index builder would loop forever).
    config.split_matrix = [config.split_matrix[0], config.split_matrix[1], None]
    return config


def check_splits(config) -> None:
    """Every split that will be built holds documents of every dataset (megatron's builder loops
    forever on an empty one): a clear error instead, naming the dataset and the split."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if config.blend_per_split is not None:
        for i, name in enumerate(("data.blend", "data.valid")):
            for prefix in config.blend_per_split[i][0]:
                if len(IndexedDataset(prefix).sequence_lengths) == 0:
                    raise BlendError(f"{name}: {prefix} holds no documents")
        return
    for prefix in config.blend[0]:
        docs = len(IndexedDataset(prefix).sequence_lengths)
        for name, bounds in zip(("train", "valid"), config.split_matrix[:2]):
            if bounds is not None and int(round(bounds[1] * docs)) - int(round(bounds[0] * docs)) <= 0:
                raise BlendError(f"data.blend: {prefix} has {docs} documents; its {name} share of data.split "
                                 f"{config.split!r} holds none (give it a larger share, or held-out data in data.valid)")


def build(config, split_sizes: list[int]) -> list:
    """[train, valid, test] datasets (None for a split not built), built as Megatron-LM builds them."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    check_splits(config)
    return BlendedMegatronDatasetBuilder(GPTDataset, split_sizes, lambda: True, config).build()
