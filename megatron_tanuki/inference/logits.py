"""Full-vocabulary logits of a (possibly parallel) model through megatron-core's forward-only schedule.

The one place that knows how to get logits out of a TP/PP/EP model: the forward-only schedule
passes activations between pipeline stages, the last stage's vocab-parallel logits are gathered
over tensor parallelism, and inputs go to the device the process group runs on. Used by
``convert verify``, greedy decoding and the parallel equivalence tests.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def device() -> torch.device:
    """The device this rank computes on: its GPU under NCCL, else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def forward_logits(chunks, ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                   images: torch.Tensor | None = None, last_only: bool = False,
                   gather: bool = True) -> torch.Tensor | None:
    """Logits of ``ids`` [b, s] (one microbatch) as float32 on the CPU, on every rank of the last
    pipeline stage (all its TP ranks hold the same gathered tensor); None on the other stages.

    Shape [b, s, padded vocab], or [b, padded vocab] with ``last_only`` (the last position, sliced
    before the device-to-host copy). ``chunks``: the model's list of (virtual) pipeline chunks, in
    eval mode. ``images`` go to Tanuki-vision models only (the first stage consumes them). Every
    rank of the model-parallel group must call this with the same shapes. ``gather=False``: the
    model's output is already whole on every TP rank (a reward head's all-reduced scores).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    dev = device()
    if position_ids is None:
        position_ids = torch.arange(ids.shape[1]).expand_as(ids)
    ids_d, pos_d = ids.to(dev), position_ids.to(dev)
    imgs = images.to(dev) if images is not None else None

    def collect(output, non_loss_data=False):
        full = gather_from_tensor_model_parallel_region(output) if gather else output
        return (full[:, -1] if last_only else full).float().cpu()

    def step(data_iterator, model):
        next(data_iterator)
        out = model(ids_d, pos_d, None, images=imgs) if imgs is not None else model(ids_d, pos_d, None)
        return out, collect

    its = [iter([None]) for _ in chunks]
    with torch.no_grad(), _output_layer_on_last_position(chunks, last_only):
        store = get_forward_backward_func()(
            forward_step_func=step, data_iterator=its if len(chunks) > 1 else its[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1, seq_length=ids.shape[1],
            micro_batch_size=ids.shape[0], forward_only=True, collect_non_loss_data=True)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and store:
        return store[0]
    return None


@contextlib.contextmanager
def _output_layer_on_last_position(chunks, enabled: bool):
    """With ``last_only``, the output layer sees only the last position's hidden state: decoding
    needs one row of logits, and the full ``[b, s, vocab]`` (65024 wide) is most of a small model's
    step. A forward pre-hook on each ``output_layer`` cuts its ``[s, b, h]`` input to ``[1, b, h]``."""
    if not enabled:
        yield
        return
    hooks = [m.register_forward_pre_hook(lambda _m, args: (args[0][-1:], *args[1:]))
             for c in chunks for name, m in c.named_modules() if name.endswith("output_layer")]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
