"""Dense Tanuki-8B -> Tanuki-8x8B MoE, the seed team's recipe, streamed tensor by tensor.

Every expert starts as the dense MLP (gate -> w1, up -> w3, down -> w2) plus ``randn * noise``;
the router is ``randn`` (its scale does not matter: the Tanuki router standardizes its logits).
Noise is seeded per tensor name, so the result does not depend on the order tensors are made.
With noise 0 all experts are identical and the MoE computes exactly the dense model.
"""
from __future__ import annotations

import os
import re
import zlib

import torch

from megatron_tanuki.convert import engine
from megatron_tanuki.convert.atomic import atomic_output_dir
from megatron_tanuki.convert.safetensors_io import CheckpointError, HFCheckpoint, ShardedWriter
from megatron_tanuki.models.tanuki.hf_config import from_hf_config

_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
_ROUTER = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight")
_DENSE_OF = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class UpcycledSource:
    """Looks like an HF Tanuki-8x8B checkpoint; every tensor is made from the dense one on demand."""

    def __init__(self, dense: HFCheckpoint, experts: int, topk: int, noise: float, seed: int):
        if dense.config.get("model_type") != "llama":
            raise CheckpointError(f"{dense.path}/config.json: upcycling needs a dense Tanuki-8B "
                                  f"(model_type 'llama'), got {dense.config.get('model_type')!r}")
        self.dense, self.noise, self.seed, self.experts = dense, noise, seed, experts
        self.path = dense.path
        self.config = {**{k: v for k, v in dense.config.items() if k not in ("architectures", "auto_map")},
                       "model_type": "tanuki", "architectures": ["TanukiForCausalLM"],
                       "num_local_experts": experts, "num_experts_per_tok": topk,
                       "router_aux_loss_coef": 0.001, "output_router_logits": False}
        self._dtype = dense.dtype(dense.names()[0])
        cfg = from_hf_config(self.config)
        self._names: dict[str, tuple] = {}
        for n in dense.names():
            if ".mlp." not in n:
                self._names[n] = dense.shape(n)
        for layer in range(cfg.num_layers):
            self._names[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = (experts, cfg.hidden_size)
            for e in range(experts):
                for w, d in _DENSE_OF.items():
                    name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                    self._names[name] = dense.shape(f"model.layers.{layer}.mlp.{d}.weight")

    def names(self):
        return list(self._names)

    def shape(self, name):
        return self._names[name]

    def dtype(self, name):
        return self._dtype

    def nbytes(self, name):
        return torch.Size(self._names[name]).numel() * torch.empty((), dtype=self._dtype).element_size()

    def side_files(self):
        return [f for f in self.dense.side_files() if f != "config.json"]

    def _randn(self, name: str, shape) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
        return torch.randn(shape, generator=g, dtype=torch.float32)

    def get(self, name: str) -> torch.Tensor:
        if m := _EXPERT.fullmatch(name):
            layer, _, w = m.groups()
            base = self.dense.get(f"model.layers.{layer}.mlp.{_DENSE_OF[w]}.weight")
            if self.noise == 0:
                return base.clone()
            return (base.float() + self._randn(name, base.shape) * self.noise).to(base.dtype)
        if _ROUTER.fullmatch(name):
            return self._randn(name, self._names[name]).to(self._dtype)
        return self.dense.get(name)


def upcycle(dense_dir: str, out: str, experts: int = 8, topk: int = 2, noise: float = 0.001, seed: int = 0,
            to: str = "hf", overwrite: bool = False) -> None:
    if not 1 <= topk <= experts:
        raise ValueError(f"--topk {topk} must be between 1 and --experts {experts}")
    src = UpcycledSource(HFCheckpoint(dense_dir), experts, topk, noise, seed)
    if to == "mcore":
        engine.source_to_mcore(src, out, overwrite)
        return
    cfg = from_hf_config(src.config)
    with atomic_output_dir(out, overwrite) as tmp:
        writer = ShardedWriter(tmp, [(n, src.shape(n), src.dtype(n)) for n in src.names()])
        try:
            for n in src.names():
                writer.add(n, src.get(n))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        engine.write_hf_side(tmp, src.config, cfg, [os.path.join(src.path, f) for f in src.side_files()])
