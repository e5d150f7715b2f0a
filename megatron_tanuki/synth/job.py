"""`tanuki synth run`: a recipe, a teacher backend, an output folder.

The teacher is either this process's engine (``--backend engine --ckpt CKPT [--tp --pp --ep]``: the
ranks are started here, or are the ranks of a torchrun / srun launch) or OpenAI-compatible servers
(``--backend openai --base-url URL [--base-url URL2 ...]``: ours, vLLM, NIM). Both run the same
scheduler (runner.py) and write the same records.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from megatron_tanuki.synth.recipe import load_recipe
from megatron_tanuki.synth.runner import RunOptions, StopFlag, run as run_schedule
from megatron_tanuki.synth.store import Store, parse_shard

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipe_schema.yaml")


@dataclass
class SynthJob:
    recipe: str
    out: str
    backend: str = "engine"              # engine | openai
    ckpt: str | None = None
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dtype: str | None = None
    fp8: str | None = None
    tokenizer: str | None = None
    kv_memory_gb: float | None = None
    max_seq_len: int | None = None
    max_tokens_per_step: int = 8192
    base_urls: list[str] = field(default_factory=list)
    api_key_env: str | None = None
    model: str | None = None
    concurrency: int = 64                # openai: the starting in-flight limit (adaptive)
    timeout_s: float = 600.0
    limit: int | None = None
    shard: str = "0/1"
    ceiling_tps: float | None = None
    grace_s: float = 120.0
    progress: bool | None = None
    nproc: int | None = None             # set by the local launcher (TP*PP*EP ranks)


def check_job(job: SynthJob):
    """Mistakes found before a model loads or a request is sent; returns the recipe."""
    recipe = load_recipe(job.recipe)
    parse_shard(job.shard)
    if job.limit is not None and job.limit < 1:
        raise ValueError(f"--limit {job.limit}: must be at least 1")
    if job.backend == "engine":
        if not job.ckpt:
            raise ValueError("--backend engine needs --ckpt CKPT (or use --backend openai --base-url URL)")
        if job.base_urls:
            raise ValueError("--base-url belongs to --backend openai")
    elif job.backend == "openai":
        if not job.base_urls:
            raise ValueError("--backend openai needs --base-url URL (one or more)")
        if job.ckpt:
            raise ValueError("--ckpt belongs to --backend engine")
        if job.api_key_env and not os.environ.get(job.api_key_env):
            raise ValueError(f"--api-key-env {job.api_key_env}: the variable is not set")
    else:
        raise ValueError(f"--backend {job.backend!r}: one of engine, openai")
    if os.path.exists(job.out) and not os.path.isdir(job.out):
        raise ValueError(f"--out {job.out}: exists and is not a folder")
    Store(job.out, recipe, writes=False).claim()  # another recipe's folder: refused before any rank starts
    return recipe


def run(job: SynthJob):
    recipe = check_job(job)
    if job.backend == "openai":
        return [_run_openai(job, recipe)]
    from megatron_tanuki.runtime.spawn import launcher_rank, run_job

    nproc = job.tp * job.pp * job.ep
    if launcher_rank() is not None or nproc == 1:
        return run_job(engine_rank, job, nproc)
    previous = _forward_stop_signals()  # ranks started here: they get the signal, this process waits for them
    try:
        return run_job(engine_rank, job, nproc)
    finally:
        _restore(previous)


def _forward_stop_signals() -> dict:
    """SIGTERM / SIGUSR1 to this process (scancel, a time limit) go on to the local ranks, which stop
    the way a rank under srun does (no new conversations, --grace, return); this process then
    returns their results and exits 0."""
    import signal

    from megatron_tanuki.runtime.spawn import signal_ranks

    def forward(sig, _frame):
        signal_ranks(sig)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    for s in previous:
        signal.signal(s, forward)
    return previous


def _options(job: SynthJob) -> RunOptions:
    return RunOptions(limit=job.limit, shard=parse_shard(job.shard), progress=job.progress,
                      ceiling_tps=job.ceiling_tps, grace_s=job.grace_s)


def _run_openai(job: SynthJob, recipe) -> dict:
    from megatron_tanuki.synth.http_backend import OpenAIBackend

    key = os.environ.get(job.api_key_env) if job.api_key_env else None
    backend = OpenAIBackend(job.base_urls, model=job.model, api_key=key, timeout_s=job.timeout_s,
                            concurrency=job.concurrency)
    stop = StopFlag()
    previous = stop.install()
    store = Store(job.out, recipe, parse_shard(job.shard))
    try:
        return run_schedule(recipe, store, backend, _options(job), stop)
    finally:
        backend.close()
        store.close()
        _restore(previous)


def engine_rank(job: SynthJob) -> dict:
    """One rank of an engine-backed run; every rank schedules alike, rank 0 writes."""
    import torch.distributed as dist

    stop = StopFlag()  # first: a signal while the model loads stops the run once it starts (not the process)
    previous = stop.install()
    recipe = load_recipe(job.recipe)
    backend = store = None
    try:
        backend = engine_backend(job, recipe.teacher.chat, recipe.teacher.system is not None, where=recipe.path)
        rank0 = dist.get_rank() == 0
        store = Store(job.out, recipe, parse_shard(job.shard), writes=rank0, share=_broadcast)
        return run_schedule(recipe, store, backend,
                            _options(job) if rank0 else RunOptions(**{**_options(job).__dict__, "progress": False}),
                            stop, log=print if rank0 else (lambda *_: None))
    finally:
        if backend is not None:
            backend.close()
        if store is not None:
            store.close()
        _restore(previous)


def engine_backend(job, chat: str | None = None, system: bool = False, where: str = "", images: bool = False):
    """An EngineBackend on this rank for ``job`` (anything with ckpt, tp, pp, ep, dtype, fp8, tokenizer,
    kv_memory_gb, max_seq_len, max_tokens_per_step): the checkpoint's model in the job's layout, its
    tokenizer, and ``chat`` (default: the architecture's template). ``system``: the requests carry a
    system message (refused for a template without a system turn)."""
    import torch.distributed as dist

    from megatron_tanuki.data import templates
    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.inference.engine import Engine, EngineOptions
    from megatron_tanuki.inference.generate import checkpoint_tokenizer, load_model
    from megatron_tanuki.models import registry
    from megatron_tanuki.synth.engine_backend import EngineBackend

    cfg, chunks, hf_vocab = load_model(job)
    tok = load_tokenizer(job.tokenizer or checkpoint_tokenizer(job.ckpt))
    llm = registry.language_model(cfg)
    options = EngineOptions(max_sequence_length=job.max_seq_len or llm.max_position_embeddings,
                            kv_memory_gb=job.kv_memory_gb, max_tokens=job.max_tokens_per_step)
    engine = Engine(chunks, tok, options, vocab_limit=min(tok.vocab_size, hf_vocab),
                    log=print if dist.get_rank() == 0 else (lambda *_: None))
    template = templates.get(chat or registry.architecture_of(cfg).default_chat)
    if system and not template.system_turn:
        raise ValueError(f"{where}: teacher.system: the {template.name} template has no system turn")
    return EngineBackend(engine, tok, template, cfg=cfg)


def _broadcast(done):
    """Rank 0's set of done ids on every rank, read before anyone appends (every rank must schedule
    the same conversations)."""
    import torch.distributed as dist

    box = [done]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _restore(previous: dict) -> None:
    import signal

    for s, h in previous.items():
        signal.signal(s, h)


def print_recipe() -> str:
    with open(SCHEMA, encoding="utf-8") as f:
        return f.read()
