"""The CPU runtime redirects exactly what megatron-core needs, and works through megatron's own code."""
import importlib

import numpy as np
import pytest
import torch

from megatron_tanuki.runtime import cpu


needs_cpu_only = pytest.mark.skipif(cpu.gpu_present(), reason="checks the CPU runtime; this host has a GPU")


@needs_cpu_only
def test_activate_is_idempotent_and_active_without_gpu():
    assert cpu.activate() is True and cpu.activate() is True and cpu.is_active()


@needs_cpu_only
def test_current_device_and_hard_coded_cuda_factories_map_to_cpu():
    cpu.activate()
    assert torch.cuda.current_device() == "cpu"
    for name in cpu._HARD_CODED_CUDA:
        mod = importlib.import_module(name)
        t = mod.torch.zeros([], dtype=torch.int, device="cuda")
        assert t.device.type == "cpu", name
    assert torch.zeros(1).cuda().device.type == "cpu"


@needs_cpu_only
def test_streams_are_inert():
    cpu.activate()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x = torch.ones(2) + 1
    x.record_stream(s)
    assert x.tolist() == [2.0, 2.0]


@needs_cpu_only
def test_alltoall_split_sizes_become_numpy():
    cpu.activate()
    from megatron.core.transformer.moe import token_dispatcher

    out = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([3, 1]), as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [3, 1]



@needs_cpu_only
def test_inference_pipeline_broadcast_takes_cpu_tensors(single_process):
    """The dynamic engine's stage-to-stage broadcast (PP) runs megatron's own code on gloo tensors;
    the presence check it made beside the CUDA one is kept."""
    from megatron.core.inference import communication_utils

    logits = torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)
    out = communication_utils.broadcast_from_last_pipeline_stage([1, 2, 3], torch.float32, logits)
    assert out is logits and out.tolist() == [[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]]
    with pytest.raises(AssertionError):
        communication_utils._is_cuda_contiguous(None)
    with pytest.raises(AssertionError):  # still a contiguity check
        communication_utils._is_cuda_contiguous(logits.transpose(1, 2))

@needs_cpu_only
def test_rng_tracker_seeds_and_forks_reproducibly(single_process):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def draw():
        model_parallel_cuda_manual_seed(42)
        with get_cuda_rng_tracker().fork():
            inside = torch.rand(3)
        return inside, torch.rand(3)

    a_in, a_out = draw()
    b_in, b_out = draw()
    assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)
    assert not torch.equal(a_in, a_out)  # the tracker's stream differs from the default one


@needs_cpu_only
def test_grad_clip_matches_torch():
    cpu.activate()
    from megatron.core.optimizer import clip_grads

    ps = [torch.nn.Parameter(torch.ones(4)) for _ in range(2)]
    for p in ps:
        p.grad = torch.full((4,), 3.0)
    total = torch.cat([p.grad for p in ps]).norm().item()
    clip_grads.clip_grad_by_total_norm_fp32(ps, 1.0, total)
    ref = torch.full((4,), 3.0) * (1.0 / (total + 1e-6))
    for p in ps:
        torch.testing.assert_close(p.grad, ref)


def test_gpus_requested_reads_launcher_variables():
    assert cpu.gpus_requested({}) == []
    assert cpu.gpus_requested({"CUDA_VISIBLE_DEVICES": "", "SLURM_GPUS_ON_NODE": "0"}) == []
    assert cpu.gpus_requested({"CUDA_VISIBLE_DEVICES": "0,1"}) == ["CUDA_VISIBLE_DEVICES=0,1"]
    assert cpu.gpus_requested({"SLURM_JOB_GPUS": "3"}) == ["SLURM_JOB_GPUS=3"]


@needs_cpu_only
def test_cpu_runtime_refuses_when_gpus_were_assigned_but_not_visible():
    import subprocess
    import sys

    code = "from megatron_tanuki.runtime import cpu; cpu.activate()"
    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": "0"}
    env.pop("TANUKI_ALLOW_CPU", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "GPUs were assigned to this process (CUDA_VISIBLE_DEVICES=0)" in r.stderr
    env["TANUKI_ALLOW_CPU"] = "1"
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_every_redirect_target_exists_in_the_installed_megatron_core():
    """The real table resolves: no redirect would be a silent no-op on this megatron-core/torch."""
    targets = cpu._redirects()
    assert "megatron.core.tensor_parallel.random:_get_cuda_rng_state" in targets
    assert "megatron.core.transformer.moe.token_dispatcher:maybe_move_tensor_to_cpu" in targets
    assert {f"{m}:torch" for m in cpu._HARD_CODED_CUDA} <= set(targets)
    cpu._check_targets(targets)


def test_a_missing_target_is_named():
    with pytest.raises(RuntimeError) as e:
        cpu._check_targets(["megatron.core.tensor_parallel.random:_get_cuda_rng_state",
                            "megatron.core.tensor_parallel.random:_get_cuda_rng_state_v2",
                            "megatron.core.no_such_module:f",
                            "torch:Tensor.no_such_method"])
    msg = str(e.value)
    assert msg.startswith("the CPU runtime cannot redirect megatron.core.tensor_parallel.random."
                          "_get_cuda_rng_state_v2, megatron.core.no_such_module.f, torch.Tensor.no_such_method: "
                          "not found in megatron-core 0.19.")
    assert msg.endswith("(renamed or removed); update megatron_tanuki/runtime/cpu.py for this version")


@needs_cpu_only
def test_every_redirect_is_in_place_after_activation():
    cpu.activate()
    for target, value in cpu._redirects().items():
        owner, attr = cpu._resolve(target)
        if attr == "torch":  # a fresh view per call: the installed one maps "cuda" to "cpu"
            assert getattr(owner, attr).zeros(1, device="cuda").device.type == "cpu", target
        else:  # the same function, or a lambda with the same code (each call makes new ones)
            installed = getattr(owner, attr)
            assert installed is value or installed.__code__ == value.__code__, target
