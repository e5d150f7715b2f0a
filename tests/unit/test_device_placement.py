"""Issue 9.1: every part of every model kind lands on the rank's device.

On a GPU node the builders run with ``device=None`` and place everything on this rank's GPU
(``builder.rank_device``). Here ``meta`` stands in for that GPU: the test replaces ``rank_device``
and builds exactly as a GPU run does. Before the fix the SigLIP tower and projector of
Tanuki-vision were built outside any device context and only the GPTModel was moved.
"""
import pytest
import torch

from megatron_tanuki.models import registry
from megatron_tanuki.models.tanuki import builder
from megatron_tanuki.models.tanuki_vision.builder import build_vlm
from megatron_tanuki.runtime.distributed import ParallelLayout

KINDS = ["tanuki-8b-tiny", "tanuki-8x8b-tiny", "tanuki-vision-8b-tiny", "tanuki-vision-8x8b-tiny"]


def _off_device(chunks, device: str) -> list[str]:
    wrong = []
    for i, c in enumerate(chunks):
        for kind, items in (("parameter", c.named_parameters()), ("buffer", c.named_buffers())):
            wrong += [f"chunk{i} {kind} {n} on {t.device}" for n, t in items if t.device.type != device]
    return wrong


@pytest.mark.parametrize("preset", KINDS)
def test_gpu_branch_puts_every_parameter_and_buffer_on_the_rank_device(single_process, monkeypatch, preset):
    monkeypatch.setattr(builder, "rank_device", lambda: torch.device("meta"))  # the stand-in GPU
    cfg = registry.get_preset(preset)
    vision = hasattr(cfg, "llm")
    opts = builder.BuildOptions(use_te=False)
    chunks = (build_vlm if vision else builder.build_model)(cfg, ParallelLayout(), opts)  # device=None
    if vision:
        assert chunks[0].vision_model is not None and chunks[0].vision_projection is not None
    assert sum(1 for c in chunks for _ in c.parameters()) > 0
    assert _off_device(chunks, "meta") == []


def test_rank_device_without_a_gpu_is_the_cpu(single_process):
    assert builder.target_device(None) == torch.device("cpu")
    assert builder.target_device("meta") == torch.device("meta")
