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
* ``maybe_move_tensor_to_cpu`` in the alltoall dispatcher: on GPU it turns the split sizes into
  numpy arrays (what ``all_to_all_single`` accepts); for a tensor already on CPU it returned the
  tensor unchanged, which ``all_to_all_single`` rejects. The CPU version converts too.
* ``torch.zeros/tensor/...(..., device="cuda")`` hard-coded in a few megatron modules (schedule
  token counters, optimizer scale and found-inf flags, grad-norm buffers, checkpoint exchange):
  those modules alone (``_HARD_CODED_CUDA``) see a ``torch`` whose factory functions map ``"cuda"``
  to ``"cpu"``.
* ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == "torch.cuda.FloatTensor"``; the CPU
  version scales the same gradients by the same ``max_norm / (total_norm + 1e-6)`` factor.
* ``Tensor.cuda()`` / ``Module.cuda()`` -> no-ops (checkpoint exchange and optimizer reload call
  them); with no GPU there is nowhere else for a tensor to go.
* The dynamic inference engine (continuous batching, ``inference/engine.py``):
  ``pin_memory=True`` host buffers in the dynamic context and the text generation controller
  (``_PINNED_HOST_BUFFERS`` see a ``torch`` view that drops the flag; ``Tensor.pin_memory()`` is
  the identity) -- pinning needs a CUDA driver; the Triton KV-append kernel asserts CUDA tensors,
  so ``dynamic_context.triton_append_key_value_cache`` is None and megatron-core takes its own
  torch scatter; ``torch.cuda.memory_stats()`` (step logging) is an empty dict.
  Under PP the engine moves activations and logits between stages with
  ``inference/communication_utils.py``, whose ``_is_cuda`` asserts ``tensor.is_cuda`` before every
  broadcast; gloo sends CPU tensors, so the CPU version asserts the same tensor is present and on
  the CPU (``_is_cuda_contiguous`` calls it through the module, so one name covers both).
  The attention kernel of the dynamic path is not a CPU matter: ``inference/attention_backend.py``
  installs it on every machine without flash-attn.

All of them are one table (:func:`_redirects`); :func:`activate` checks that every target exists
before it replaces any, so a megatron-core rename fails by name instead of silently doing nothing.
Entry points call :func:`activate` (the CLI, ``launch.train_rank``, ``init_distributed`` /
``init_single_process``); building a model or reading a checkpoint does not.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import types

import torch

_ACTIVE = False

# megatron-core modules that write device="cuda" literally.
_HARD_CODED_CUDA = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.utils",
)

# megatron-core modules that allocate pinned host buffers (pinning needs a CUDA driver).
_PINNED_HOST_BUFFERS = (
    "megatron.core.inference.contexts.dynamic_context",
    "megatron.core.inference.text_generation_controllers.text_generation_controller",
)


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
    """A view of ``torch`` whose factory functions map device "cuda" to "cpu" and drop
    ``pin_memory=True``.

    Installed only as the ``torch`` global of megatron modules that hard-code ``device="cuda"``
    or allocate pinned host buffers.
    """
    view = types.ModuleType("torch")
    view.__dict__.update(real_torch.__dict__)
    for name in ("zeros", "ones", "empty", "full", "tensor", "arange", "empty_like", "zeros_like"):
        fn = getattr(real_torch, name)

        @functools.wraps(fn)
        def wrapper(*args, __fn=fn, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            kwargs.pop("pin_memory", None)
            return __fn(*args, **kwargs)

        setattr(view, name, wrapper)
    return view


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip (same factor, in place), without its CUDA tensor-type assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(clip_coeff, torch.Tensor):
        clip_coeff = clip_coeff.clamp_max(1.0)
    elif clip_coeff >= 1.0:
        return
    for g in grads:
        g.detach().mul_(clip_coeff)


def _maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    """megatron's alltoall helper, converting a CPU tensor too (see the module docstring)."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.cpu().numpy()
    return tensor


def _is_on_cpu(tensor):
    """megatron's inference ``_is_cuda`` check for the device gloo communicates on."""
    assert tensor is not None
    assert tensor.device.type == "cpu", f"expected a CPU tensor, got one on {tensor.device}"


def _redirects() -> dict:
    """Every name the CPU runtime replaces, as ``"module:attribute.path" -> replacement``."""
    seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # noqa: E731
    r = {
        "torch.cuda:current_device": lambda: "cpu",
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
        "torch.cuda:manual_seed": seed,
        "torch.cuda:manual_seed_all": seed,
        "torch.cuda:get_rng_state": lambda device=None: torch.get_rng_state(),
        "torch.cuda:set_rng_state": lambda state, device=None: torch.set_rng_state(state),
        "torch.cuda:synchronize": lambda device=None: None,
        "torch.cuda:Stream": _InertStream,
        "torch.cuda:Event": _InertStream,
        "torch.cuda:current_stream": lambda device=None: _InertStream(),
        "torch.cuda:stream": lambda stream=None: contextlib.nullcontext(),
        "torch.cuda:is_current_stream_capturing": lambda: False,
        "torch:Tensor.record_stream": lambda self, stream: None,
        "torch:Tensor.cuda": lambda self, *args, **kwargs: self,
        "torch:nn.Module.cuda": lambda self, *args, **kwargs: self,
        "torch:Tensor.pin_memory": lambda self, *args, **kwargs: self,
        "torch.cuda:memory_stats": lambda device=None: {},
        # the Triton KV append asserts CUDA tensors; None selects megatron's torch scatter
        "megatron.core.inference.contexts.dynamic_context:triton_append_key_value_cache": None,
        # the dynamic engine's pipeline broadcasts assert CUDA tensors (see the docstring)
        "megatron.core.inference.communication_utils:_is_cuda": _is_on_cpu,
        "megatron.core.tensor_parallel.random:_get_cuda_rng_state":
            lambda device=None, clone=False, graph_safe=False: torch.get_rng_state(),
        "megatron.core.tensor_parallel.random:_set_cuda_rng_state":
            lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state),
        # token_dispatcher imported the name from moe_utils: its own binding is the one it calls.
        "megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu": _maybe_move_tensor_to_cpu,
        "megatron.core.optimizer.clip_grads:clip_grad_by_total_norm_fp32": _clip_grad_by_total_norm_fp32,
        "megatron.core.optimizer.optimizer:clip_grad_by_total_norm_fp32": _clip_grad_by_total_norm_fp32,
    }
    view = _module_torch_without_cuda(torch)
    r.update({f"{name}:torch": view for name in _HARD_CODED_CUDA + _PINNED_HOST_BUFFERS})
    return r


def _resolve(target: str):
    """``"module:a.b"`` -> (the object holding ``b``, ``"b"``); AttributeError/ImportError if absent."""
    module, path = target.split(":")
    owner = importlib.import_module(module)
    *parents, attr = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, attr


def _check_targets(targets) -> None:
    """Fail, naming each one, when a target to replace does not exist (renamed or removed in this
    megatron-core or torch): setting it anyway would add an attribute nobody calls."""
    missing = []
    for target in targets:
        try:
            owner, attr = _resolve(target)
            present = hasattr(owner, attr)
        except (ImportError, AttributeError):
            present = False
        if not present:
            missing.append(target.replace(":", "."))
    if missing:
        from importlib import metadata

        raise RuntimeError(
            f"the CPU runtime cannot redirect {', '.join(missing)}: not found in megatron-core "
            f"{metadata.version('megatron-core')} / torch {torch.__version__} (renamed or removed); "
            f"update megatron_tanuki/runtime/cpu.py for this version")


_GPU_REQUEST_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE")


def gpus_requested(env=None) -> list[str]:
    """Launcher variables that say this process was given GPUs (e.g. by Slurm's --gpus)."""
    env = os.environ if env is None else env
    none = {"", "-1", "NoDevFiles"}
    found = [f"{v}={env[v]}" for v in _GPU_REQUEST_VARS if env.get(v, "").strip() not in none]
    return [f for f in found if f != "SLURM_GPUS_ON_NODE=0"]


def activate() -> bool:
    """Install the CPU redirects if (and only if) no GPU is present. Idempotent.

    Returns True when the CPU runtime is active. Refuses when the launcher gave this process GPUs
    that torch cannot see (driver or CUDA-build mismatch): a 47B job must not quietly run on gloo.
    ``TANUKI_ALLOW_CPU=1`` overrides.
    """
    global _ACTIVE
    if _ACTIVE:
        return True
    if gpu_present():
        return False
    requested = gpus_requested()
    if requested and os.environ.get("TANUKI_ALLOW_CPU") != "1":
        raise RuntimeError(
            f"GPUs were assigned to this process ({', '.join(requested)}) but torch sees none "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False): check the driver and "
            f"the CUDA build of torch. Set TANUKI_ALLOW_CPU=1 to run on the CPU anyway.")

    redirects = _redirects()
    _check_targets(redirects)  # all or nothing: a renamed target must not become a silent no-op
    for target, value in redirects.items():
        owner, attr = _resolve(target)
        setattr(owner, attr, value)

    _ACTIVE = True
    return True
