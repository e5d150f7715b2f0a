"""The run config: one YAML per run (examples/*.yaml), ``key=value`` overrides, saved with checkpoints.

Sections mirror how a Megatron-LM user thinks of a run: ``model`` (what), ``parallel`` (how it is
split), ``data``, ``train`` (optimization), ``checkpoint``, ``log``. Unknown keys and wrong types
are errors that name the key and the file, so a typo never silently falls back to a default.
``model.preset`` and ``train.mode`` have no default: a config that forgets them must not quietly
train some default model.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import yaml

MODES = ("pretrain", "sft", "vlm_stage1", "vlm_stage2")
FORMATS = ("text", "chat", "llava", "indexed")
SCHEDULES = ("cosine", "linear", "constant")


class ConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    preset: str | None = None  # required: a preset name (`tanuki model-info --list`)
    overrides: dict = field(default_factory=dict)  # language-model fields, e.g. rope_theta: 10000
    dtype: str = "bf16"  # fp32 | bf16 | fp16
    fp8: str | None = None  # e4m3 | hybrid (Transformer Engine on H100)
    recompute_granularity: str | None = None  # None | selective | full
    recompute_num_layers: int | None = None
    moe_aux_loss_coeff: float | None = None  # None: the preset's (0.001 for Tanuki-8x8B)
    moe_grouped_gemm: bool | None = None  # experts as grouped GEMMs; None: on a GPU yes, on CPU no
    init_checkpoint: str | None = None  # `tanuki convert hf-to-mcore` output or a training checkpoint


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int | None = None
    cp: int = 1
    sp: bool = False


@dataclass
class DataSection:
    format: str = "llava"  # text | indexed (pretraining) | chat (SFT) | llava (VLM)
    train: list = field(default_factory=list)  # JSONL / JSON files (text, chat, llava)
    # indexed: Megatron-LM's --data-path: [weight, prefix, weight, prefix, ...] or [prefix, ...], each prefix
    # a `tanuki preprocess-data` / Megatron-LM tools/preprocess_data.py output (PREFIX.bin + PREFIX.idx)
    blend: list = field(default_factory=list)
    split: str = "969,30,1"  # indexed without data.valid: train,valid,test shares of every dataset
    # held-out data for validation: files of data.format (text, chat, llava) or a blend (indexed)
    valid: list = field(default_factory=list)
    cache_dir: str | None = None  # indexed: sample-index cache (None: Megatron-LM's, beside each dataset)
    prefetch: int = 2  # steps of batches built ahead of the step in a background thread (0: on the step's path)
    image_folder: str | None = None  # llava: image paths are relative to it
    template: str | None = None  # alpaca | plain | v1 (default by mode)
    tokenizer: str | None = None  # .model or a HF tokenizer folder; None: the shipped Tanuki model
    seq_length: int = 2048
    pack: bool = True  # SFT/VLM: several samples per row, attention kept inside each sample
    max_bad_records: int = 100  # skipped (and logged) before the run stops


@dataclass
class TrainSection:
    mode: str | None = None  # required: pretrain | sft | vlm_stage1 | vlm_stage2
    seed: int = 1234
    global_batch_size: int = 8  # rows (packed sequences) per optimizer step, all DP ranks together
    micro_batch_size: int = 1
    train_steps: int | None = None
    epochs: float | None = None  # used when train_steps is None
    lr: float = 2e-5
    min_lr: float = 0.0
    lr_schedule: str = "cosine"
    warmup_fraction: float = 0.03
    # On resume: false keeps the checkpoint's LR schedule (megatron-core's default; a changed lr /
    # train_steps is reported, not applied); true applies this config's (Megatron-LM's
    # --override-opt_param-scheduler). The progress output says which one is in force.
    override_lr_scheduler: bool = False
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    use_distributed_optimizer: bool = True
    exit_after_steps: int | None = None  # leave (with a checkpoint) after this many steps of this job
    # validation (when there is held-out data: data.valid, or the valid share of data.split)
    eval_interval: int | None = None  # steps between evaluations; None: only the final one
    eval_iters: int = 100  # global batches per evaluation (Megatron-LM's default), the same ones each time
    # DDP communication (Megatron-LM's settings for large runs); overlap_param_gather needs the
    # distributed optimizer (GPUs) and overlap_grad_reduce, as in Megatron-LM; bucket size None:
    # megatron-core's (max(40M, 1M x DP) parameters)
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    ddp_bucket_size: int | None = None


@dataclass
class CheckpointSection:
    dir: str | None = None
    save_interval: int | None = None  # steps; a checkpoint is always written at the end
    keep_last: int | None = 3
    async_save: bool = False
    resume: bool = True  # continue from dir/latest when it exists


@dataclass
class LogSection:
    interval: int = 10
    tensorboard_dir: str | None = None
    # debugging a data pipeline: every rank writes what each step fed it (tokens, labels, loss mask,
    # positions per micro-batch) to DIR/step-NNNNNN-rank-R.pt
    dump_batches: str | None = None


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def validate(self, source: str = "config") -> "RunConfig":
        t, d = self.train, self.data
        if not self.model.preset:
            raise ConfigError(f"{source}: model.preset is required (one of the names `tanuki model-info "
                              f"--list` prints, e.g. tanuki-8x8b)")
        if t.mode is None:
            raise ConfigError(f"{source}: train.mode is required (one of {list(MODES)})")
        _choice(source, "train.mode", t.mode, MODES)
        _choice(source, "data.format", d.format, FORMATS)
        _choice(source, "train.lr_schedule", t.lr_schedule, SCHEDULES)
        if t.mode.startswith("vlm") and d.format != "llava":
            raise ConfigError(f"{source}: train.mode {t.mode} needs data.format llava, got {d.format}")
        if t.mode == "pretrain" and d.format not in ("text", "indexed"):
            raise ConfigError(f"{source}: train.mode pretrain needs data.format text or indexed, got {d.format}")
        if d.format == "indexed" and t.mode != "pretrain":
            raise ConfigError(f"{source}: data.format indexed is for train.mode pretrain, got {t.mode}")
        if t.train_steps is None and t.epochs is None:
            raise ConfigError(f"{source}: set train.train_steps or train.epochs")
        if t.global_batch_size % t.micro_batch_size:
            raise ConfigError(f"{source}: train.global_batch_size {t.global_batch_size} is not a multiple "
                              f"of train.micro_batch_size {t.micro_batch_size}")
        if d.format == "indexed":
            if not d.blend:
                raise ConfigError(f"{source}: data.format indexed needs data.blend (e.g. [0.7, data/ja_web_text_document, "
                                  f"0.3, data/code_text_document])")
            if d.train:
                raise ConfigError(f"{source}: data.train is for JSONL formats; with data.format indexed use data.blend")
            if t.train_steps is None:
                raise ConfigError(f"{source}: data.format indexed needs train.train_steps (Megatron-LM's --train-iters): "
                                  f"the sample index is built for that many steps")
        elif not d.train:
            raise ConfigError(f"{source}: data.train lists no files")
        if t.eval_interval is not None and t.eval_interval <= 0:
            raise ConfigError(f"{source}: train.eval_interval must be a positive number of steps, got {t.eval_interval}")
        if t.eval_iters <= 0:
            raise ConfigError(f"{source}: train.eval_iters must be positive, got {t.eval_iters}")
        if d.prefetch < 0:
            raise ConfigError(f"{source}: data.prefetch must be >= 0, got {d.prefetch}")
        return self


def _choice(source, key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{source}: {key} must be one of {list(allowed)}, got {value!r}")


def _build(cls, data: dict, source: str, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'the file'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{source}: unknown key {name!r} (known in {prefix.rstrip('.') or 'top level'}: "
                              f"{', '.join(known)})")
        ftype = known[key].type
        if dataclasses.is_dataclass(_SECTIONS.get(key)) and prefix == "":
            kwargs[key] = _build(_SECTIONS[key], value or {}, source, f"{key}.")
        else:
            kwargs[key] = _coerce(value, ftype, source, name)
    return cls(**kwargs)


def _coerce(value, ftype: str, source: str, name: str):
    """Check a leaf value against the annotation (strings, since annotations are postponed)."""
    if value is None:
        if "None" in ftype:
            return None
        raise ConfigError(f"{source}: {name} may not be null")
    base = ftype.split("|")[0].strip()
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    elif base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {name} must be an integer, got {value!r}")
    elif base == "float":
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads "1e-4" as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {name} must be a number, got {value!r}")
        value = float(value)
    elif base == "str" and not isinstance(value, str):
        raise ConfigError(f"{source}: {name} must be a string, got {value!r}")
    elif base == "list":
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
    elif base == "dict" and not isinstance(value, dict):
        raise ConfigError(f"{source}: {name} must be a mapping, got {value!r}")
    return value


_SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}


def apply_override(tree: dict, assignment: str) -> None:
    """``train.lr=1e-4`` (value parsed as YAML) into the nested dict ``tree``."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"override {assignment!r}: the key needs a section, e.g. train.lr=1e-4")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def load(path: str | None, overrides=()) -> RunConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides, validate."""
    tree = {}
    source = path or "<defaults>"
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                tree = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: invalid YAML: {e}") from None
    for o in overrides:
        try:
            apply_override(tree, o)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    if overrides:
        source += " + overrides"
    return _build(RunConfig, tree, source, "").validate(source)
