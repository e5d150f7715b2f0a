"""mlp2x_gelu on megatron-core equals LLaVA-JP's nn.Sequential(Linear, GELU, Linear)."""
import torch

from megatron_tanuki.models.vision.projector import HF_NAMES, build_projector


def test_projector_equals_llava_jp_sequential(single_process):
    from megatron_tanuki.runtime.distributed import ParallelLayout

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.GELU(), torch.nn.Linear(16, 16))
    proj = build_projector(20, 16, ParallelLayout()).eval()
    hf = {f"model.mm_projector.{k}": v for k, v in ref.state_dict().items()}
    params = dict(proj.named_parameters())
    assert set(params) == set(HF_NAMES.values())
    with torch.no_grad():
        for hf_name, name in HF_NAMES.items():
            params[name].copy_(hf[hf_name])
        x = torch.randn(2, 7, 20)
        assert (proj(x) - ref(x)).abs().max().item() <= 1e-6
