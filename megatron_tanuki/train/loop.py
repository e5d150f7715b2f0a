"""`tanuki train`: the rank-side training loop on megatron-core.

Per step: the feed (train/feed.py: JSONL rows through data/stream.py, or megatron-core GPTDataset
samples for indexed blends) has this rank's micro-batches ready, built ahead in a background thread
(data/prefetch.py; the progress line reports how long the step waited for them); megatron-core's
schedule runs them (pipelined / interleaved as the layout says); DDP reduces gradients (overlapped
with the backward when train.overlap_grad_reduce), the (distributed) optimizer steps, the LR
scheduler follows. With held-out data, train.eval_interval / eval_iters evaluate the loss and
perplexity on the same held-out batches each time, and once more at the end.
Checkpoints hold model, optimizer, scheduler, data position and step, so a restart continues the
same run bit for bit (same layout) or within fp32 tolerance (another layout).
"""
from __future__ import annotations

import json
import math
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


class _Data:
    """The run's data: the training feed, the held-out batches, and how they were made."""

    def __init__(self, tok, feed, bad, image_bad, total_steps: int, describe: str, eval_batches=None,
                 eval_note: str = ""):
        self.tok, self.feed, self.bad, self.image_bad = tok, feed, bad, image_bad
        self.total_steps, self.describe = total_steps, describe
        self.eval_batches, self.eval_note = eval_batches, eval_note  # () -> iterator of micro-batch lists


def _data(cfg: RunConfig, mcfg, dp: int, dp_rank: int, log) -> _Data:
    from megatron_tanuki.data.records import BadRecords
    from megatron_tanuki.data.tokenizer import load_tokenizer

    d, t = cfg.data, cfg.train
    tok = load_tokenizer(d.tokenizer)
    bad = BadRecords(d.max_bad_records, log=log)
    image_bad = BadRecords(limit=10**12, log=lambda *a: print(f"[rank {dist.get_rank()}]", *a, flush=True))
    flops = (lambda images: _flops_per_row(mcfg, d.seq_length, images))
    if d.format == "indexed":
        return _indexed_data(cfg, tok, bad, image_bad, dp, dp_rank, flops)
    from megatron_tanuki.data.records import RecordIndex
    from megatron_tanuki.data.samples import SampleBuilder
    from megatron_tanuki.data.stream import RowStream
    from megatron_tanuki.train.feed import RowFeed

    template = d.template or {"vlm_stage1": "plain", "vlm_stage2": "v1"}.get(t.mode)
    build = SampleBuilder(d.format, template, tok, d.seq_length, d.image_folder, getattr(mcfg, "num_image_tokens", 0))
    pretrain, packed = t.mode == "pretrain", d.pack and t.mode != "pretrain"

    def feed_of(index, bad_records, images_bad):
        stream = RowStream(index, build, d.seq_length, t.seed, pretrain=pretrain, pack=d.pack,
                           bad=bad_records)
        return RowFeed(stream, t.global_batch_size, t.micro_batch_size, dp, dp_rank, d.seq_length, tok.pad_id,
                       getattr(mcfg, "image_size", None), images_bad, packed, flops)

    feed = feed_of(RecordIndex(d.train), bad, image_bad)
    total = t.train_steps or max(1, int(t.epochs * feed.stream.rows_per_epoch() / t.global_batch_size + 0.999))
    describe = f"{len(feed.stream.index)} records"
    if not d.valid:
        return _Data(tok, feed, bad, image_bad, total, describe)
    valid_index = RecordIndex(d.valid)
    quiet = BadRecords(limit=10**12, log=lambda *a: None)
    held_rows = feed_of(valid_index, quiet, quiet).stream.rows_per_epoch()
    iters = min(t.eval_iters, max(1, held_rows // t.global_batch_size))
    held_bad = BadRecords(limit=10**12, log=log)  # bad held-out records are named once, at the first evaluation

    def eval_batches():
        steps = feed_of(valid_index, quiet if eval_batches.named else held_bad, quiet).steps()
        eval_batches.named = True
        return (next(steps).micro for _ in range(iters))

    eval_batches.named = False

    note = f"{iters} batches of {t.global_batch_size} rows from {len(valid_index)} held-out records"
    if held_rows < t.global_batch_size:
        note += f" (they make {held_rows} rows, fewer than a global batch: rows repeat)"
    return _Data(tok, feed, bad, image_bad, total, describe, eval_batches, note)


def _indexed_data(cfg: RunConfig, tok, bad, image_bad, dp: int, dp_rank: int, flops) -> _Data:
    from megatron_tanuki.data import blend
    from megatron_tanuki.train.feed import IndexedFeed, indexed_eval_batches

    d, t = cfg.data, cfg.train
    train_blend = blend.parse_blend(d.blend, "data.blend")
    valid_blend = blend.parse_blend(d.valid, "data.valid") if d.valid else None
    config = blend.gpt_config(tok, t.seed, d.seq_length, train_blend, valid_blend, d.split, d.cache_dir)
    train_ds, valid_ds, _ = blend.build(
        config, blend.sizes(t.train_steps, t.global_batch_size, t.eval_iters, t.eval_interval))
    if train_ds is None or len(train_ds) < t.train_steps * t.global_batch_size:
        raise ValueError(f"data.blend: the training split has {0 if train_ds is None else len(train_ds)} samples, "
                         f"fewer than train.train_steps x global_batch_size")
    feed = IndexedFeed(train_ds, t.global_batch_size, t.micro_batch_size, dp, dp_rank, flops)
    weights = train_blend[1] or ["size"] * len(train_blend[0])
    describe = "indexed blend " + ", ".join(f"{w} {os.path.basename(p)}" for w, p in zip(weights, train_blend[0]))
    if valid_ds is None:
        return _Data(tok, feed, bad, image_bad, t.train_steps, describe)

    source = "data.valid" if valid_blend else f"the valid share of data.split {d.split}"
    # an unweighted blend's valid split is at most one pass over its documents (megatron's sizing)
    iters = min(t.eval_iters, len(valid_ds) // t.global_batch_size)
    if iters == 0:
        raise ValueError(f"{source}: {len(valid_ds)} held-out samples of {d.seq_length} tokens, fewer than one "
                         f"global batch ({t.global_batch_size}); give validation more data")

    def eval_batches():
        return indexed_eval_batches(valid_ds, iters, t.global_batch_size, t.micro_batch_size, dp, dp_rank)

    fewer = f" (train.eval_iters {t.eval_iters}: the held-out data holds {iters})" if iters < t.eval_iters else ""
    return _Data(tok, feed, bad, image_bad, t.train_steps, describe, eval_batches,
                 f"{iters} batches of {t.global_batch_size} samples from {source}{fewer}")


def _dump(folder: str, step: int, rank: int, micro) -> None:
    os.makedirs(folder, exist_ok=True)
    keep = ("tokens", "labels", "loss_mask", "position_ids")
    torch.save([{k: getattr(b, k) for k in keep} for b in micro], os.path.join(folder, f"step-{step:06d}-rank-{rank}.pt"))


def evaluate(chunks, batches) -> tuple[float, float]:
    """Held-out loss (token mean over every batch) and perplexity; the same on every rank."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    from megatron_tanuki.train.step import loss_totals, params_gathered_before, resume_param_overlap

    params_gathered_before(chunks)
    for c in chunks:
        c.eval()
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for micro in batches:
            ls, n = loss_totals(chunks, micro, forward_only=True)
            loss_sum, tokens = loss_sum + ls, tokens + n
    for c in chunks:
        c.train()
    get_moe_metrics_tracker().clear()  # the router's balance statistics are the training steps'
    resume_param_overlap(chunks)
    loss = loss_sum / max(tokens, 1.0)
    return loss, math.exp(min(loss, 80.0))


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
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed
    from megatron_tanuki.train import checkpoint as ckpt
    from megatron_tanuki.train.step import (Communication, forward_backward, params_gathered_before,
                                            resume_param_overlap, wrap_ddp)

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
    if layout.sp and cfg.data.seq_length % layout.tp:
        raise ValueError(f"data.seq_length {cfg.data.seq_length} is not divisible by TP={layout.tp}: sequence "
                         f"parallelism splits every sequence across the TP ranks")
    if t.global_batch_size % (dp * t.micro_batch_size):
        raise ValueError(f"train.global_batch_size {t.global_batch_size} is not divisible by DP={dp} x "
                         f"micro_batch_size {t.micro_batch_size}")

    say(f"[train] reading the data ({cfg.data.format}, seq {cfg.data.seq_length})")
    data = _data(cfg, mcfg, dp, dp_rank, log=lambda *a: print(f"[rank {env.rank}]", *a, flush=True) if rank0 else None)
    tok, feed, bad, image_bad, total_steps = data.tok, data.feed, data.bad, data.image_bad, data.total_steps

    say(f"[train] {data.describe}, {total_steps} steps; building {cfg.model.preset} "
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
    comm = Communication(t.overlap_grad_reduce, t.overlap_param_gather, t.ddp_bucket_size)
    chunks = wrap_ddp(chunks, use_distributed_optimizer=t.use_distributed_optimizer, comm=comm)
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
        feed.restore(common["data"])
        say(f"[train] resumed from {path} at step {step}")
        if t.override_lr_scheduler:  # the scheduler reads each group's max_lr / min_lr first
            for group in opt.param_groups:
                group["max_lr"], group["min_lr"] = t.lr, t.min_lr
            sched.step(increment=0)  # the next update already uses them
        say(_schedule_report(cfg, sched, wanted))

    n_trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    say(f"[train] {cfg.model.preset} ({t.mode}), layout {layout.describe()} DP={dp} on {env.world_size} "
        f"{'GPUs' if torch.cuda.is_available() else 'CPU ranks'}; {n_trainable:,} trainable parameters on rank 0; "
        f"{data.describe}, {total_steps} steps of {t.global_batch_size} rows x {cfg.data.seq_length}")
    tb = None
    if rank0 and cfg.log.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(cfg.log.tensorboard_dir)

    position = feed.position()  # of the last step consumed: prefetched batches are made again after a restart
    bad_reasons = dict(bad.reasons)  # likewise the bad records counted up to it

    def save():
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.model.dtype]
        side = {"files": {"config.yaml": cfg.to_yaml(),
                          META_FILE: meta_json(mcfg, dtype, hf_vocab, source=f"training step {step}")}}
        side["copy"] = [os.path.join(init, d) for d in ("hf", "carried") if init and os.path.isdir(os.path.join(init, d))]
        common = {"step": step, "data": position, "consumed_rows": consumed, "bad_records": bad_reasons}
        params_gathered_before(chunks)  # the saved weights are the optimizer's latest
        path = ckpt.save(root, step, chunks, opt, sched, common, side, cfg.checkpoint.keep_last,
                         cfg.checkpoint.async_save)
        resume_param_overlap(chunks)
        say(f"[train] saved {path}")

    valid_log = []

    def run_eval(final: bool) -> float:
        t_eval = time.perf_counter()
        vloss, ppl = evaluate(chunks, data.eval_batches())
        valid_log.append({"step": step, "loss": vloss, "ppl": ppl})
        say(f"[eval] step {step:6d}/{total_steps}  valid loss {vloss:8.4f}  ppl {ppl:10.3f}  "
            f"({data.eval_note}, {time.perf_counter() - t_eval:.1f} s{', final' if final else ''})")
        if tb:
            tb.add_scalar("valid/loss", vloss, step)
            tb.add_scalar("valid/ppl", ppl, step)
        return time.perf_counter() - t_eval

    if data.eval_batches:
        say(f"[train] validation: {data.eval_note}, "
            + (f"every {t.eval_interval} steps and " if t.eval_interval else "") + "at the end")
    from megatron_tanuki.data.prefetch import Prefetcher

    prefetch = Prefetcher(feed.steps(), depth=cfg.data.prefetch)
    losses, t0, tokens_window, flops_window, window_t0 = [], time.perf_counter(), 0, 0.0, time.perf_counter()
    ran, window_steps = 0, 0
    last_loss = float("nan")
    try:
        while step < total_steps:
            item = prefetch.next()
            if cfg.log.dump_batches:
                _dump(cfg.log.dump_batches, step + 1, env.rank, item.micro)
            for c in chunks:
                c.zero_grad_buffer()
            opt.zero_grad()
            loss = forward_backward(chunks, item.micro, cfg.data.seq_length, t.micro_batch_size)
            ok, grad_norm, _ = opt.step()
            sched.step(increment=1)
            step += 1
            ran += 1
            window_steps += 1
            consumed += t.global_batch_size
            position, bad_reasons = item.position, item.bad_reasons
            losses.append(loss)
            last_loss = loss
            real = _all_reduce(torch.tensor([item.real_tokens, item.image_bad],
                                            dtype=torch.float64), parallel_state.get_data_parallel_group())
            tokens_window += real[0].item()
            bad.check(sum(item.bad_reasons.values()) + int(real[1].item()))
            flops_window += item.flops
            balance = _moe_balance_loss(llm.num_layers, len(item.micro)) if llm.is_moe else None
            if step % cfg.log.interval == 0 or step == total_steps or step == 1:
                dt = time.perf_counter() - window_t0
                lr = opt.param_groups[0]["lr"]
                eta = (time.perf_counter() - t0) / ran * (total_steps - step)
                tflops = flops_window / max(dt, 1e-9) / env.world_size / 1e12
                wait_ms = prefetch.take_wait() / window_steps * 1e3
                say(f"[train] step {step:6d}/{total_steps}  loss {loss:8.4f}  lr {lr:.3e}  grad-norm "
                    f"{(grad_norm or 0.0):7.3f}  {tokens_window / dt:9.0f} tokens/s  {tflops:7.3f} TFLOPS/GPU"
                    + (f"  moe-balance {balance:.4f}" if balance is not None else "")
                    + f"  data-wait {wait_ms:6.1f} ms/step  ETA {eta / 60:.1f} min")
                if tb:
                    tb.add_scalar("train/loss", loss, step)
                    tb.add_scalar("train/lr", lr, step)
                    tb.add_scalar("train/grad_norm", grad_norm or 0.0, step)
                    tb.add_scalar("train/tokens_per_s", tokens_window / dt, step)
                    tb.add_scalar("train/tflops_per_gpu", tflops, step)
                    tb.add_scalar("train/data_wait_ms", wait_ms, step)
                    if balance is not None:
                        tb.add_scalar("train/moe_load_balancing_loss", balance, step)
                tokens_window, flops_window, window_t0, window_steps = 0, 0.0, time.perf_counter(), 0
            stop = _all_reduce(torch.tensor([1.0 if stopper.requested else 0.0]))
            leaving = stop.item() > 0 or (t.exit_after_steps is not None and ran >= t.exit_after_steps)
            # a signal leaves at once (Slurm's grace is for the checkpoint, not for an evaluation)
            if data.eval_batches and not stop.item() and (
                    step == total_steps or (t.eval_interval and step % t.eval_interval == 0)):
                window_t0 += run_eval(final=step == total_steps)  # throughput leaves the evaluation out
            if root and (step == total_steps or leaving or
                         (cfg.checkpoint.save_interval and step % cfg.checkpoint.save_interval == 0)):
                save()
            if leaving:
                say(f"[train] stopping at step {step} ({'signal' if stop.item() else 'train.exit_after_steps'})")
                break
    finally:
        prefetch.close()
    elapsed = time.perf_counter() - t0
    if root and rank0 and step >= total_steps:
        with open(os.path.join(root, "finished"), "w") as f:  # read by slurm/*.sh (requeue or not)
            f.write(f"{step}\n")
    if tb:
        tb.close()
    summary = {"steps": step, "ran": ran, "seconds": round(elapsed, 1), "final_loss": last_loss, "valid": valid_log,
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
