"""One training step on megatron-core: DDP wrapping, forward/backward schedule, loss reduction.

The loss is a per-token mean over the *real* (unmasked) tokens of the whole global batch:
``calculate_per_token_loss`` makes megatron-core sum token losses and divide the gradients by the
token count of all DP ranks in ``finalize_model_grads``, so ranks with more padding do not weigh
more. Everything here runs unchanged on GPUs (NCCL) and on CPU (gloo, runtime.cpu).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_tanuki.runtime import cpu


@dataclass
class Batch:
    """A micro-batch, [batch, seq] each. ``loss_mask`` is 1 where the token counts."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None  # [b, 1, s, s] True = masked out (not used in training)
    images: torch.Tensor | None = None  # [n, 3, H, W] normalized pixels, Tanuki-vision only
    packed_seq_params: object | None = None  # megatron-core PackedSeqParams (THD); tensors are [1, t]

    @classmethod
    def causal_lm(cls, ids: torch.Tensor, pad_id: int | None = None) -> "Batch":
        """Next-token prediction on a [b, s+1] block of ids."""
        tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        mask = torch.ones_like(labels, dtype=torch.float32)
        if pad_id is not None:
            mask = (labels != pad_id).float()
        pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()
        return cls(tokens, labels, mask, pos)

    def to(self, device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        params = self.packed_seq_params
        if params is not None:  # TE reads cu_seqlens on the GPU
            params = dataclasses.replace(params, **{
                f: move(getattr(params, f)) for f in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded",
                                                      "cu_seqlens_kv_padded")})
        return Batch(*(move(getattr(self, f)) for f in ("tokens", "labels", "loss_mask", "position_ids",
                                                         "attention_mask", "images")), packed_seq_params=params)


def configure_for_training(chunks: list, per_token_loss: bool = True) -> None:
    """Set the schedule hooks megatron-core reads from the model config (as Megatron-LM's
    training.py sets them): with overlapped gradient reduction the schedule starts each chunk's
    reduction when its last micro-batch's backward is done (``grad_sync_func``), and with
    overlapped parameter gathering it starts the next chunk's all-gather early (``param_sync_func``)."""
    cfg = chunks[0].config
    cfg.calculate_per_token_loss = per_token_loss
    cfg.finalize_model_grads_func = finalize_model_grads
    if isinstance(chunks[0], DistributedDataParallel):
        one = (lambda fns: fns if len(fns) > 1 else fns[0])
        ddp = chunks[0].ddp_config
        cfg.no_sync_func = one([c.no_sync for c in chunks])
        cfg.grad_sync_func = one([c.start_grad_sync for c in chunks]) if ddp.overlap_grad_reduce else None
        cfg.param_sync_func = (one([c.start_param_sync for c in chunks])
                               if ddp.overlap_param_gather and ddp.align_param_gather else None)


@dataclass
class Communication:
    """DDP settings (train.overlap_grad_reduce, overlap_param_gather, ddp_bucket_size)."""

    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    bucket_size: int | None = None


def wrap_ddp(chunks: list, use_distributed_optimizer: bool = False, comm: Communication | None = None) -> list:
    """megatron-core DDP around each model chunk (contiguous fp32 grad buffers). Parameter gathering
    is overlapped only with the distributed optimizer (there is nothing to gather without it)."""
    comm = comm or Communication()
    configure_for_training(chunks)  # DDP reads calculate_per_token_loss when it is built
    # as Megatron-LM: parameter gathering overlaps only together with gradient reduction, and the
    # schedule aligns the gathers (param_sync_func) only with virtual pipeline chunks -- without them
    # the forward pre-hooks dispatch each bucket's all-gather ahead of its use themselves
    gather = comm.overlap_param_gather and comm.overlap_grad_reduce and use_distributed_optimizer
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=comm.overlap_grad_reduce, overlap_param_gather=gather,
        align_param_gather=gather and len(chunks) > 1, bucket_size=comm.bucket_size,
        use_distributed_optimizer=use_distributed_optimizer)
    wrapped = [
        DistributedDataParallel(c.config, ddp_cfg, c, disable_bucketing=(i > 0))
        for i, c in enumerate(chunks)
    ]
    configure_for_training(wrapped)
    return wrapped


def params_gathered_before(chunks: list) -> None:
    """With overlapped parameter gathering the optimizer's update reaches the model only in the next
    forward's pre-hooks; before an evaluation or a checkpoint the gather is done now, and the hooks
    are off until ``resume_param_overlap`` (Megatron-LM's disable/enable_forward_pre_hook)."""
    for c in chunks:
        if getattr(c, "use_forward_hook", False) and c.remove_forward_pre_hook_handles:
            c.disable_forward_pre_hook(param_sync=True)


def resume_param_overlap(chunks: list) -> None:
    for c in chunks:
        if getattr(c, "use_forward_hook", False) and not c.remove_forward_pre_hook_handles:
            c.enable_forward_pre_hook()


def _forward_step(data_iterator, model):
    batch: Batch = next(data_iterator)
    if not cpu.is_active():
        batch = batch.to(torch.cuda.current_device())
    extra = {"images": batch.images} if batch.images is not None else {}
    if batch.packed_seq_params is not None:
        extra["packed_seq_params"] = batch.packed_seq_params
    output = model(batch.tokens, batch.position_ids, batch.attention_mask, labels=batch.labels, **extra)

    def loss_func(per_token_loss: torch.Tensor):
        mask = batch.loss_mask.to(per_token_loss.dtype)
        loss_sum = (per_token_loss.float() * mask).sum()
        num_tokens = batch.loss_mask.sum().to(torch.int)
        report = torch.stack([loss_sum.detach(), num_tokens.float()])
        return loss_sum, num_tokens, {"lm_loss": report}

    return output, loss_func


def forward_backward(chunks: list, microbatches: Iterable[Batch], seq_length: int | None = None,
                     micro_batch_size: int | None = None, forward_only: bool = False) -> float:
    """Run the schedule over ``microbatches``; return the token-mean loss of the global batch.

    The loss is reduced over DP ranks and broadcast from the last pipeline stage, so every rank
    returns the same number. The pipeline's activation shape comes from the micro-batches
    themselves (a packed THD batch is ``[1, rows * seq]``); given sizes must agree with them.
    """
    loss_sum, tokens = loss_totals(chunks, microbatches, seq_length, micro_batch_size, forward_only)
    return loss_sum / max(tokens, 1.0)


def loss_totals(chunks: list, microbatches: Iterable[Batch], seq_length: int | None = None,
                micro_batch_size: int | None = None, forward_only: bool = False) -> tuple[float, float]:
    """(summed token loss, loss tokens) of the global batch, the same on every rank."""
    microbatches = list(microbatches)
    mbs, seq = microbatches[0].tokens.shape
    if (seq_length, micro_batch_size) not in ((None, None), (seq, mbs)) and \
            microbatches[0].packed_seq_params is None:
        raise ValueError(f"micro-batches are [{mbs}, {seq}] but seq_length={seq_length}, "
                         f"micro_batch_size={micro_batch_size} were given")
    seq_length, micro_batch_size = seq, mbs
    chunks_cfg = chunks[0].config
    if not getattr(chunks_cfg, "finalize_model_grads_func", None):
        configure_for_training(chunks)
    # One iterator per model chunk: with virtual stages each chunk reads every micro-batch.
    data_iterators = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    fwd_bwd = get_forward_backward_func()
    store = fwd_bwd(
        forward_step_func=_forward_step, data_iterator=data_iterators,
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(microbatches),
        seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=forward_only)
    totals = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in store:
            totals += item["lm_loss"].double().cpu()
    return _reduce_totals(totals)


def _reduce_totals(totals: torch.Tensor) -> tuple[float, float]:
    """Sum (loss, tokens) over DP, then share the last pipeline stage's value with all stages."""
    device = "cpu" if dist.get_backend() == "gloo" else torch.cuda.current_device()
    totals = totals.to(device)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, tokens = totals.tolist()
    return loss_sum, tokens
