"""Process start-up and parallel layout: one place for torchrun, Slurm and megatron-core groups.

The layout is validated against the world size *and* the model before any process group or
module is built, so a wrong launch fails in a second with a sentence, not after model build
with an assertion deep inside megatron-core.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from megatron_tanuki.runtime import cpu


class LayoutError(ValueError):
    """A parallel layout that cannot work for this world size or this model."""


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved schedule)
    ep: int = 1  # expert parallel
    etp: int | None = None  # expert tensor parallel (None: same as tp)
    cp: int = 1  # context parallel
    sp: bool = False  # sequence parallel (needs tp > 1)

    @property
    def expert_tp(self) -> int:
        return self.etp if self.etp is not None else self.tp

    def mcore_sizes(self) -> dict:
        """The sizes under megatron-core's names (initialize_model_parallel, TransformerConfig)."""
        return dict(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            context_parallel_size=self.cp,
            expert_model_parallel_size=self.ep,
            expert_tensor_parallel_size=self.expert_tp,
        )

    def describe(self) -> str:
        parts = [f"TP={self.tp}", f"PP={self.pp}"]
        if self.vpp:
            parts.append(f"VPP={self.vpp}")
        parts += [f"EP={self.ep}", f"ETP={self.expert_tp}", f"CP={self.cp}"]
        if self.sp:
            parts.append("SP")
        return " ".join(parts)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ParallelLayout":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LayoutError(f"unknown parallel layout field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def validate(self, world_size: int, model=None) -> None:
        """Raise LayoutError naming the first thing that cannot work.

        ``model`` is a TanukiConfig (or anything with the same attribute names).
        """
        for name in ("tp", "pp", "ep", "cp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LayoutError(f"{name} must be a positive integer, got {v!r}")
        if self.etp is not None and self.etp < 1:
            raise LayoutError(f"etp must be a positive integer, got {self.etp!r}")
        mp = self.tp * self.pp * self.cp
        if world_size % mp:
            raise LayoutError(
                f"world size {world_size} is not divisible by TP*PP*CP = "
                f"{self.tp}*{self.pp}*{self.cp} = {mp}")
        dp = world_size // mp
        expert_mp = self.expert_tp * self.ep * self.pp
        if world_size % expert_mp:
            raise LayoutError(
                f"world size {world_size} is not divisible by ETP*EP*PP = "
                f"{self.expert_tp}*{self.ep}*{self.pp} = {expert_mp}")
        if (self.tp * self.cp * dp) % (self.expert_tp * self.ep):
            raise LayoutError(
                f"ETP*EP = {self.expert_tp * self.ep} must divide TP*CP*DP = {self.tp * self.cp * dp}")
        if self.cp > 1:
            # Nothing splits the sequence across CP ranks or corrects the loss for it yet (the
            # data path, the SDPA attention and the loss would all need it): refuse, never train wrongly.
            raise LayoutError(f"context parallel CP={self.cp} is not implemented in megatron_tanuki yet "
                              f"(no sequence split or loss correction): use cp=1")
        if self.sp and self.tp == 1:
            raise LayoutError("sequence parallel (sp) needs TP > 1")
        if self.vpp is not None:
            if self.pp == 1:
                raise LayoutError("virtual pipeline stages (vpp) need PP > 1")
            if self.vpp < 1:
                raise LayoutError(f"vpp must be a positive integer, got {self.vpp!r}")
        if model is None:
            return
        name = getattr(model, "name", "model")
        if model.num_attention_heads % self.tp:
            raise LayoutError(
                f"{name}: {model.num_attention_heads} attention heads are not divisible by TP={self.tp}")
        if model.num_query_groups % self.tp:
            raise LayoutError(
                f"{name}: {model.num_query_groups} KV heads (query groups) are not divisible by TP={self.tp}")
        if model.ffn_hidden_size % self.tp and not model.num_experts:
            raise LayoutError(f"{name}: FFN size {model.ffn_hidden_size} is not divisible by TP={self.tp}")
        stages = self.pp * (self.vpp or 1)
        if model.num_layers % stages:
            raise LayoutError(
                f"{name}: {model.num_layers} layers are not divisible into PP*VPP = {stages} pipeline stages")
        if self.ep > 1 and not model.num_experts:
            raise LayoutError(f"{name} is dense: expert parallel EP={self.ep} needs a MoE model")
        if model.num_experts:
            if model.num_experts % self.ep:
                raise LayoutError(f"{name}: {model.num_experts} experts are not divisible by EP={self.ep}")
            if model.ffn_hidden_size % self.expert_tp:
                raise LayoutError(
                    f"{name}: expert FFN size {model.ffn_hidden_size} is not divisible by ETP={self.expert_tp}")
            if self.tp > 1 and not self.sp:
                raise LayoutError(
                    f"{name}: MoE with TP={self.tp} requires sequence parallel (set sp=true)")


@dataclass(frozen=True)
class LaunchEnv:
    """Who am I: read from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm (SLURM_PROCID/...)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, env=None) -> "LaunchEnv":
        env = os.environ if env is None else env
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
            local = int(env.get("SLURM_LOCALID", 0))
        else:
            rank, world, local = 0, 1, 0
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env) or "127.0.0.1"
        port = int(env.get("MASTER_PORT", 29500 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return cls(rank, world, local, addr, port)


def _first_slurm_host(env) -> str | None:
    """First host of the step's (else the job's) node list, without calling scontrol: rank 0 of an
    srun step runs there. Slurm's hostlist syntax: top-level commas separate host expressions, and an
    expression may hold several bracket groups of comma-separated numbers or ranges, expanded
    leftmost first, zero padding kept: "gpu-a[01-02,05],gpu-b[10-11]" -> "gpu-a01",
    "rack[1-2]-node[05-06]" -> "rack1-node05". slurm/common.sh exports MASTER_ADDR from
    `scontrol show hostnames` where scontrol exists; this is the fallback."""
    var = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)), None)
    if var is None:
        return None
    text = env[var].strip()
    host, i = [], 0
    while i < len(text) and text[i] != ",":  # the first host expression ends at a top-level comma
        if text[i] == "[":
            end = text.find("]", i)
            first = text[i + 1:end].split(",")[0].split("-")[0].strip() if end > 0 else ""
            if not first.isdigit():
                raise ValueError(f"{var}={text!r}: cannot read the bracket group at position {i} "
                                 f"(expected [N], [N-M] or [N-M,K,...])")
            host.append(first)
            i = end + 1
        elif text[i] == "]":
            raise ValueError(f"{var}={text!r}: ']' without '[' at position {i}")
        else:
            host.append(text[i])
            i += 1
    if not host:
        raise ValueError(f"{var}={text!r}: no host name before the first ','")
    return "".join(host)


def init_distributed(layout: ParallelLayout, model=None, env: LaunchEnv | None = None,
                     timeout_minutes: int = 30, seed: int = 1234) -> LaunchEnv:
    """Validate the layout, start torch.distributed, and build megatron-core's groups.

    On a CPU-only machine the CPU runtime is activated and gloo is used; otherwise NCCL.
    """
    env = env or LaunchEnv.from_environ()
    layout.validate(env.world_size, model)
    on_cpu = cpu.activate()
    if not dist.is_initialized():
        if not on_cpu:
            # With one GPU visible per task (--gpus-per-task=1) SLURM_LOCALID may exceed the count.
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        # One process needs no network rendezvous: a port it would bind could be taken meanwhile.
        where = (dict(store=dist.HashStore()) if env.world_size == 1
                 else dict(init_method=f"tcp://{env.master_addr}:{env.master_port}"))
        dist.init_process_group(
            backend="gloo" if on_cpu else "nccl", rank=env.rank, world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes), **where)
    setup_model_parallel(layout, seed=seed)
    return env


def init_single_process(layout: ParallelLayout | None = None, model=None, seed: int = 1234) -> None:
    """A one-process world with no networking (HashStore): model-info, unit tests, tools."""
    layout = layout or ParallelLayout()
    layout.validate(1, model)
    on_cpu = cpu.activate()
    if not dist.is_initialized():
        if not on_cpu:
            torch.cuda.set_device(0)
        dist.init_process_group("gloo" if on_cpu else "nccl", store=dist.HashStore(), rank=0,
                                world_size=1)
    setup_model_parallel(layout, seed=seed)


def setup_model_parallel(layout: ParallelLayout, seed: int = 1234) -> None:
    """(Re)build megatron-core's parallel groups on an initialized torch.distributed."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**layout.mcore_sizes(), create_gloo_process_groups=False)
    set_seeds(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())


def set_seeds(seed: int) -> None:
    """Python, NumPy, torch and megatron-core's tracked RNGs from one seed.

    Callers offset the seed by ``100 * pp_rank`` as Megatron-LM does: every pipeline stage must not
    start from the same random stream, or a from-scratch model gets identical layers on each stage.
    """
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
