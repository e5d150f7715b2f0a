"""TanukiRMSNorm computes HF Llama's RMSNorm and carries the sequence-parallel tag."""
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from megatron_tanuki.models.common.norm import TanukiRMSNorm


class _Cfg:
    params_dtype = torch.float32
    sequence_parallel = True


def test_equals_hf_llama_rmsnorm():
    torch.manual_seed(0)
    ours, hf = TanukiRMSNorm(_Cfg(), 64, eps=1e-5), LlamaRMSNorm(64, eps=1e-5)
    w = torch.randn(64)
    with torch.no_grad():
        ours.weight.copy_(w)
        hf.weight.copy_(w)
    x = torch.randn(7, 3, 64) * 4
    torch.testing.assert_close(ours(x), hf(x), rtol=0, atol=2e-6)
    xb = x.bfloat16()
    ours, hf = ours.bfloat16(), hf.bfloat16()
    torch.testing.assert_close(ours(xb), hf(xb), rtol=0, atol=0)


def test_weight_is_tagged_for_sequence_parallel_grad_reduction():
    assert TanukiRMSNorm(_Cfg(), 8).weight.sequence_parallel is True
