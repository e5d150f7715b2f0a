"""The CPU runtime: what megatron-core needs to run on a machine without a GPU.

megatron-core 0.19 assumes CUDA in a handful of places that have nothing to do with the maths:
tensors allocated on ``torch.cuda.current_device()``, the CUDA RNG tracker, side streams in the
MoE dispatcher, and ``device="cuda"`` token counters in the pipeline schedules. On a CPU-only
machine (tests, the demo, ``convert verify`` on login nodes) we redirect exactly those to CPU
equivalents. Nothing here is applied when a GPU is present: :func:`activate` is a no-op then.

Redirected, and why:

* ``torch.cuda.current_device()`` -> ``"cpu"``: megatron passes it as ``device=`` to factory
  functions and ``.to()`` (layers, RoPE ``inv_freq``, router buffers, p2p shape exchange).
* ``torch.cuda.manual_seed/get_rng_state/set_rng_state`` and megatron's ``_get_cuda_rng_state`` /
  ``_set_cuda_rng_state`` -> the CPU generator: ``model_parallel_cuda_manual_seed`` and the RNG
  tracker fork/restore states; on CPU that state is the CPU generator's.
* ``torch.cuda.Stream/Event/stream/current_stream`` -> inert objects: the alltoall dispatcher and
  MoE layer overlap work on side streams; on CPU everything is already ordered.
* ``torch.zeros(..., device="cuda")`` inside ``pipeline_parallel.schedules`` (token counter): that
  module alone sees a ``torch`` whose factory functions map ``"cuda"`` to ``"cpu"``.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch

_ACTIVE = False


def gpu_present() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def is_active() -> bool:
    """True once the redirects are installed (CPU-only process)."""
    return _ACTIVE


class _InertStream:
    """Stands in for torch.cuda.Stream/Event on CPU: ordering is already sequential."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _InertStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _module_torch_without_cuda(real_torch):
    """A view of ``torch`` whose factory functions map device "cuda" to "cpu".

    Installed only as the ``torch`` global of megatron modules that hard-code ``device="cuda"``.
    """
    view = types.ModuleType("torch")
    view.__dict__.update(real_torch.__dict__)
    for name in ("zeros", "ones", "empty", "full", "tensor", "arange"):
        fn = getattr(real_torch, name)

        @functools.wraps(fn)
        def wrapper(*args, __fn=fn, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return __fn(*args, **kwargs)

        setattr(view, name, wrapper)
    return view


def activate() -> bool:
    """Install the CPU redirects if (and only if) no GPU is present. Idempotent.

    Returns True when the CPU runtime is active.
    """
    global _ACTIVE
    if _ACTIVE:
        return True
    if gpu_present():
        return False

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.get_rng_state = lambda device=None: torch.get_rng_state()
    cuda.set_rng_state = lambda state, device=None: torch.set_rng_state(state)
    cuda.synchronize = lambda device=None: None
    cuda.Stream = _InertStream
    cuda.Event = _InertStream
    cuda.current_stream = lambda device=None: _InertStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.is_current_stream_capturing = lambda: False
    torch.Tensor.record_stream = lambda self, stream: None

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )

    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _module_torch_without_cuda(torch)

    _ACTIVE = True
    return True
