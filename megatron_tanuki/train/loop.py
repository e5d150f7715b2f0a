"""`tanuki train`: the rank-side training loop on megatron-core.

Per step: every rank builds the same global batch of rows (data/stream.py), keeps its DP share,
cuts it into micro-batches and runs megatron-core's schedule (pipelined / interleaved as the
layout says); DDP reduces gradients, the (distributed) optimizer steps, the LR scheduler follows.
Checkpoints hold model, optimizer, scheduler, data position and step, so a restart continues the
same run bit for bit (same layout) or within fp32 tolerance (another layout).
"""
from __future__ import annotations

import json
import os
import signal
import time

import torch
import torch.distributed as dist

from megatron_tanuki.train.config import RunConfig

COMMON_KEYS = ("step", "data", "consumed_rows", "bad_records")


class _Stop:
    """SIGTERM / SIGUSR1 (Slurm preemption or time limit): finish the step, checkpoint, exit."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._set)

    def _set(self, *_):
        self.requested = True


def _model_config(cfg: RunConfig):
    """The preset with ``model.overrides`` applied; the mode must be one its architecture trains."""
    from megatron_tanuki.models import registry
    from megatron_tanuki.train.config import ConfigError

    preset = registry.get_preset(cfg.model.preset)
    arch = registry.architecture_of(preset)
    if cfg.train.mode not in arch.modes:
        trains = f"trains {', '.join(arch.modes)}" if arch.modes else "is not trained by tanuki train"
        raise ConfigError(f"train.mode {cfg.train.mode} is not for {cfg.model.preset} ({arch.name} {trains})")
    try:
        return registry.with_overrides(preset, cfg.model.overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _build(cfg: RunConfig, mcfg, layout):
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.tanuki.builder import BuildOptions

    m = cfg.model
    opts = BuildOptions(dtype=m.dtype, fp8=m.fp8, recompute_granularity=m.recompute_granularity,
                        recompute_num_layers=m.recompute_num_layers, moe_aux_loss_coeff=m.moe_aux_loss_coeff,
                        moe_grouped_gemm=m.moe_grouped_gemm)
    chunks = registry.build(mcfg, layout, opts)
    registry.architecture_of(mcfg).set_mode(chunks, cfg.train.mode)
    return chunks


def _saved_lrs(path: str | None, t) -> tuple[float, float]:
    """(max_lr, min_lr) of the checkpoint's parameter groups: megatron-core 0.19 matches saved
    groups by an identifier that includes them, so the optimizer is rebuilt with them to load its
    state (the schedule is chosen afterwards). Read from the saved scheduler state, which holds the
    values actually in force (a config.yaml may name an lr that was reported but not applied)."""
    if not path:
        return t.lr, t.min_lr
    from megatron.core import dist_checkpointing

    sched = dist_checkpointing.load_common_state_dict(path).get("scheduler", {})
    return float(sched.get("max_lr", t.lr)), float(sched.get("min_lr", t.min_lr))


def _optimizer(cfg: RunConfig, chunks, total_steps: int, group_lrs: tuple[float, float] | None = None):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    dtype = cfg.model.dtype
    lr, min_lr = group_lrs or (t.lr, t.min_lr)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=t.weight_decay,
                        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                        clip_grad=t.clip_grad, bf16=dtype == "bf16", fp16=dtype == "fp16",
                        params_dtype=torch.float32 if dtype == "fp32" else torch.bfloat16,
                        use_distributed_optimizer=t.use_distributed_optimizer),
        chunks, use_gloo_process_groups=False)
    warmup = int(round(t.warmup_fraction * total_steps))
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0 if warmup else t.lr, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, 1), lr_decay_style=t.lr_schedule, start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=not t.override_lr_scheduler,
        override_opt_param_scheduler=t.override_lr_scheduler)
    return opt, sched


def _schedule(sched) -> dict:
    return {"lr": sched.max_lr, "min_lr": sched.min_lr, "warmup_steps": sched.lr_warmup_steps,
            "decay_steps": sched.lr_decay_steps, "style": sched.lr_decay_style}


def _schedule_report(cfg: RunConfig, sched, wanted: dict) -> str:
    """Which LR schedule a resumed run follows, in words (megatron keeps the checkpoint's silently)."""
    have = _schedule(sched)
    text = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in have.items())
    if cfg.train.override_lr_scheduler:
        return f"[train] LR schedule: this config's (train.override_lr_scheduler=true): {text}"
    changed = {k: v for k, v in wanted.items() if have[k] != v}
    line = f"[train] LR schedule: the checkpoint's: {text}"
    if changed:
        line += ("; this config asks for " + ", ".join(f"{k} {v}" for k, v in changed.items())
                 + " -- not applied (set train.override_lr_scheduler=true to apply it)")
    return line


def _hf_vocab_size(init: str | None, tok) -> int:
    """The HF ``vocab_size`` an export of this run must carry: the initial checkpoint's (its
    config.json is copied into every training checkpoint), else the tokenizer's."""
    from megatron_tanuki.models.checkpoint_meta import META_FILE, read_meta

    if init and os.path.isfile(os.path.join(init, META_FILE)):
        return read_meta(init).hf_vocab_size
    return tok.vocab_size


def _data(cfg: RunConfig, mcfg, log):
    from megatron_tanuki.data.records import BadRecords, RecordIndex
    from megatron_tanuki.data.samples import SampleBuilder
    from megatron_tanuki.data.stream import RowStream
    from megatron_tanuki.data.tokenizer import load_tokenizer

    d, mode = cfg.data, cfg.train.mode
    template = d.template or {"vlm_stage1": "plain", "vlm_stage2": "v1"}.get(mode)
    vision = getattr(mcfg, "num_image_tokens", 0)
    tok = load_tokenizer(d.tokenizer)
    build = SampleBuilder(d.format, template, tok, d.seq_length, d.image_folder, vision)
    bad = BadRecords(d.max_bad_records, log=log)
    stream = RowStream(RecordIndex(d.train), build, d.seq_length, cfg.train.seed, pretrain=mode == "pretrain",
                       pack=d.pack, bad=bad)
    return tok, stream, bad


def _flops_per_row(mcfg, seq: int, images: int) -> float:
    from megatron_tanuki.models.registry import architecture_of

    return architecture_of(mcfg).flops_per_row(mcfg, seq, images)


def _all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks; NCCL needs the tensor on the GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=group)
    return t.cpu()


def _moe_balance_loss(num_layers: int, num_micro: int) -> float | None:
    """Tanuki router's load-balancing loss (without its coefficient), mean over layers and
    micro-batches, summed over pipeline stages and averaged over DP; 1.0 is perfectly balanced."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    entry = tracker.metrics.get("load_balancing_loss")
    local = float(entry.values.sum().item()) if entry is not None else 0.0
    group = entry.reduce_group if entry is not None else None  # TP x CP with sequence parallelism
    tracker.clear()
    if group is not None:
        local = _all_reduce(torch.tensor([local], dtype=torch.float64), group).item()
    t = _all_reduce(torch.tensor([local], dtype=torch.float64), parallel_state.get_pipeline_model_parallel_group())
    t = _all_reduce(t, parallel_state.get_data_parallel_group()) / parallel_state.get_data_parallel_world_size()
    return t.item() / (num_layers * num_micro)


def train(cfg: RunConfig) -> dict:
    """Rank side: one process of the run."""
    from megatron.core import parallel_state

    from megatron_tanuki.models.checkpoint_meta import META_FILE, meta_json
    from megatron_tanuki.train.batches import collate
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed
    from megatron_tanuki.train import checkpoint as ckpt
    from megatron_tanuki.train.step import forward_backward, wrap_ddp

    mcfg = _model_config(cfg)
    from megatron_tanuki.models.registry import language_model

    llm = language_model(mcfg)
    layout = ParallelLayout(**vars(cfg.parallel))
    env = init_distributed(layout, llm, seed=cfg.train.seed)
    rank0 = env.rank == 0
    say = (lambda *a: print(*a, flush=True)) if rank0 else (lambda *a: None)
    stopper = _Stop()
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    t = cfg.train
    rows_per_rank = t.global_batch_size // dp
    if layout.sp and cfg.data.seq_length % layout.tp:
        raise ValueError(f"data.seq_length {cfg.data.seq_length} is not divisible by TP={layout.tp}: sequence "
                         f"parallelism splits every sequence across the TP ranks")
    if t.global_batch_size % (dp * t.micro_batch_size):
        raise ValueError(f"train.global_batch_size {t.global_batch_size} is not divisible by DP={dp} x "
                         f"micro_batch_size {t.micro_batch_size}")

    say(f"[train] indexing {len(cfg.data.train)} data file(s) ({cfg.data.format}, seq {cfg.data.seq_length})")
    tok, stream, bad = _data(cfg, mcfg, log=lambda *a: print(f"[rank {env.rank}]", *a, flush=True) if rank0 else None)
    image_bad = type(bad)(limit=10**12, log=lambda *a: print(f"[rank {env.rank}]", *a, flush=True))
    total_steps = t.train_steps or max(1, int(t.epochs * stream.rows_per_epoch() / t.global_batch_size + 0.999))

    say(f"[train] {len(stream.index)} records, {total_steps} steps; building {cfg.model.preset} "
        f"({cfg.model.dtype}, {layout.describe()})")
    chunks = _build(cfg, mcfg, layout)
    init = cfg.model.init_checkpoint and ckpt.resolve(cfg.model.init_checkpoint)
    if init:
        allow = ("vision_projection.",) if t.mode == "vlm_stage1" else ()
        ckpt.load_weights(init, chunks, allow_missing=allow, log=say)
    hf_vocab = _hf_vocab_size(init, tok)
    from megatron_tanuki.runtime import cpu

    if t.use_distributed_optimizer and cpu.is_active():
        # megatron-core's DistributedOptimizer accepts only torch.cuda.*Tensor parameters (and gloo has
        # no reduce-scatter): on CPU the plain optimizer, whose checkpoint state is reshardable too.
        say("[train] CPU runtime: train.use_distributed_optimizer=true applies on GPUs; using the plain optimizer")
        t.use_distributed_optimizer = False
    chunks = wrap_ddp(chunks, use_distributed_optimizer=t.use_distributed_optimizer)
    root = cfg.checkpoint.dir
    if root:  # another model's / mode's checkpoints in this folder: refuse before resuming or mixing them
        ckpt.check_run_folder(root, cfg.model.preset, t.mode)
    resume = ckpt.resolve(root) if root and cfg.checkpoint.resume and os.path.isfile(
        os.path.join(root, ckpt.LATEST)) else None
    opt, sched = _optimizer(cfg, chunks, total_steps, group_lrs=_saved_lrs(resume, t))
    wanted = _schedule(sched)  # this config's schedule, before a resume may replace it

    step, consumed = 0, 0
    if resume:
        path = resume
        common = ckpt.load_training_state(path, chunks, opt, sched, COMMON_KEYS)
        step, consumed = common["step"], common["consumed_rows"]
        stream.load_state_dict(common["data"])
        say(f"[train] resumed from {path} at step {step}")
        if t.override_lr_scheduler:  # the scheduler reads each group's max_lr / min_lr first
            for group in opt.param_groups:
                group["max_lr"], group["min_lr"] = t.lr, t.min_lr
            sched.step(increment=0)  # the next update already uses them
        say(_schedule_report(cfg, sched, wanted))

    n_trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    say(f"[train] {cfg.model.preset} ({t.mode}), layout {layout.describe()} DP={dp} on {env.world_size} "
        f"{'GPUs' if torch.cuda.is_available() else 'CPU ranks'}; {n_trainable:,} trainable parameters on rank 0; "
        f"{len(stream.index)} records, {total_steps} steps of {t.global_batch_size} rows x {cfg.data.seq_length}")
    tb = None
    if rank0 and cfg.log.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(cfg.log.tensorboard_dir)

    def save():
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.model.dtype]
        side = {"files": {"config.yaml": cfg.to_yaml(),
                          META_FILE: meta_json(mcfg, dtype, hf_vocab, source=f"training step {step}")}}
        side["copy"] = [os.path.join(init, d) for d in ("hf", "carried") if init and os.path.isdir(os.path.join(init, d))]
        common = {"step": step, "data": stream.state_dict(), "consumed_rows": consumed,
                  "bad_records": dict(bad.reasons)}
        path = ckpt.save(root, step, chunks, opt, sched, common, side, cfg.checkpoint.keep_last,
                         cfg.checkpoint.async_save)
        say(f"[train] saved {path}")

    image_size = getattr(mcfg, "image_size", None)
    losses, t0, tokens_window, flops_window, window_t0 = [], time.perf_counter(), 0, 0.0, time.perf_counter()
    ran = 0
    last_loss = float("nan")
    while step < total_steps:
        rows = stream.next_rows(t.global_batch_size)
        mine = rows[dp_rank * rows_per_rank:(dp_rank + 1) * rows_per_rank]
        real_tokens = sum(len(r) for r in mine)  # before padding
        micro = [collate(mine[i:i + t.micro_batch_size], cfg.data.seq_length, tok.pad_id, image_size,
                         image_bad, packed=cfg.data.pack and t.mode != "pretrain")
                 for i in range(0, len(mine), t.micro_batch_size)]
        for c in chunks:
            c.zero_grad_buffer()
        opt.zero_grad()
        loss = forward_backward(chunks, micro, cfg.data.seq_length, t.micro_batch_size)
        ok, grad_norm, _ = opt.step()
        sched.step(increment=1)
        step += 1
        ran += 1
        consumed += t.global_batch_size
        losses.append(loss)
        last_loss = loss
        real = _all_reduce(torch.tensor([real_tokens, image_bad.total],
                                        dtype=torch.float64), parallel_state.get_data_parallel_group())
        tokens_window += real[0].item()
        bad.check(bad.total + int(real[1].item()))
        flops_window += sum(_flops_per_row(mcfg, cfg.data.seq_length, len(r.images)) for r in rows)
        balance = _moe_balance_loss(llm.num_layers, len(micro)) if llm.is_moe else None
        if step % cfg.log.interval == 0 or step == total_steps or step == 1:
            dt = time.perf_counter() - window_t0
            lr = opt.param_groups[0]["lr"]
            eta = (time.perf_counter() - t0) / ran * (total_steps - step)
            tflops = flops_window / max(dt, 1e-9) / env.world_size / 1e12
            say(f"[train] step {step:6d}/{total_steps}  loss {loss:8.4f}  lr {lr:.3e}  grad-norm "
                f"{(grad_norm or 0.0):7.3f}  {tokens_window / dt:9.0f} tokens/s  {tflops:7.3f} TFLOPS/GPU"
                + (f"  moe-balance {balance:.4f}" if balance is not None else "") + f"  ETA {eta / 60:.1f} min")
            if tb:
                tb.add_scalar("train/loss", loss, step)
                tb.add_scalar("train/lr", lr, step)
                tb.add_scalar("train/grad_norm", grad_norm or 0.0, step)
                tb.add_scalar("train/tokens_per_s", tokens_window / dt, step)
                tb.add_scalar("train/tflops_per_gpu", tflops, step)
                if balance is not None:
                    tb.add_scalar("train/moe_load_balancing_loss", balance, step)
            tokens_window, flops_window, window_t0 = 0, 0.0, time.perf_counter()
        stop = _all_reduce(torch.tensor([1.0 if stopper.requested else 0.0]))
        leaving = stop.item() > 0 or (t.exit_after_steps is not None and ran >= t.exit_after_steps)
        if root and (step == total_steps or leaving or
                     (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0)):
            save()
        if leaving:
            say(f"[train] stopping at step {step} ({'signal' if stop.item() else 'train.exit_after_steps'})")
            break
    elapsed = time.perf_counter() - t0
    if root and rank0 and step >= total_steps:
        with open(os.path.join(root, "finished"), "w") as f:  # read by slurm/*.sh (requeue or not)
            f.write(f"{step}\n")
    if tb:
        tb.close()
    summary = {"steps": step, "ran": ran, "seconds": round(elapsed, 1), "final_loss": last_loss,
               "losses": losses, "bad_records": bad.summary(), "image_bad_records": image_bad.summary(),
               "checkpoint": ckpt.resolve(root) if root and os.path.exists(os.path.join(root, ckpt.LATEST)) else None}
    say(f"[train] done: {step}/{total_steps} steps in {elapsed:.0f} s, final loss {last_loss:.4f}; "
        f"bad records: {bad.summary()}" + (f"; checkpoint {summary['checkpoint']}" if summary["checkpoint"] else ""))
    return summary


def main_from_env(config_path: str, overrides=()) -> dict:
    """Under torchrun or srun: this process is one rank."""
    from megatron_tanuki.train.config import load

    return train(load(config_path, overrides))


def summary_json(s: dict) -> str:
    """The run summary (steps, time, per-step losses, bad records, checkpoint) as JSON."""
    return json.dumps(s, ensure_ascii=False)
