"""`tanuki generate`: a JSONL file of requests -> a JSONL file of completions, resumable.

Input, one request a line: ``{"id", "prompt"}`` or ``{"id", "messages": [{"role", "content"}...]}``,
``"image"`` (a path, relative to the input file's folder; Tanuki-vision), and optional per-request
``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop``, ``seed``, ``logprobs``. A ``prompt``
is one user turn; both are rendered with the chat template (``--chat``; ``none`` = the raw text).
Output: ``{"id", "text", "finish_reason", "prompt_tokens", "completion_tokens"}`` (+ ``"error"``
and ``"line"`` for a request that cannot be served, + ``"logprobs"``, + ``"scores"`` with
``--score``). Records are appended one whole line at a time (``flock``); a rerun skips the ids
already in the output file, so a killed job resumes; a torn last line is dropped first. An error
record stands for its input *line* (a repeated id's error must not mark the first use done).

Ranks: every rank of a request group (the tensor-, pipeline- and expert-parallel ranks that step
together) reads the same file and submits the same requests in the same order; requests are
spread over the groups by line; one rank of each group writes.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from megatron_tanuki.data.records import LineWriter as Writer  # noqa: F401 (generate's output writer)
from megatron_tanuki.inference.engine import Completion, Engine, EngineOptions, RequestError, SamplingOptions

SAMPLING_FIELDS = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int,
                   "logprobs": bool}


@dataclass
class GenerateJob:
    ckpt: str
    input: str
    output: str
    tp: int = 1
    pp: int = 1
    ep: int = 1
    nproc: int | None = None
    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    chat: str | None = None              # None: tanuki (LLM) / llava-v1 (Tanuki-vision)
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    kv_memory_gb: float | None = None
    max_seq_len: int | None = None       # None: the model's max_position_embeddings
    max_tokens_per_step: int = 8192
    score: tuple[str, ...] = ()          # --score yes,no
    prompt_logprobs: bool = False        # with --score: each prompt token's log-likelihood
    tokenizer: str | None = None
    dtype: str | None = None             # None: the checkpoint's
    fp8: str | None = None               # e4m3 | hybrid: TE FP8 compute and FP8 weights (GPU + TE only)
    progress: bool | None = None         # None: when stderr is a terminal (TANUKI_PROGRESS=1/0 forces)


# -------------------------------------------------------------------------- reading requests

@dataclass
class Parsed:
    line: int
    key: str                             # the id as text (resume, seeds); "@line N" when missing or repeated
    id: object                           # the id as given (echoed in the output)
    request: dict | None = None
    error: str | None = None


def read_done(path: str) -> set[str]:
    """Keys already answered in ``path``: an answer's id, an error record's ``"@line N"``; a torn
    last line (killed mid-write) is cut off first."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        print(f"[tanuki] {path}: dropped a torn last line ({len(data) - keep} bytes) left by a killed run",
              file=sys.stderr)
        data = data[:keep]
    done = set()
    # split on b"\n" only: str.splitlines would also cut at U+2028 and friends inside generated text
    for n, raw in enumerate(data.split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: not a JSON line; is this a tanuki generate output file?") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise ValueError(f"{path}:{n}: a record without \"id\"; is this a tanuki generate output file?")
        done.add(_line_key(rec["line"]) if rec.get("finish_reason") == "error" and "line" in rec
                 else _key(rec["id"], rec.get("line")))
    return done


def is_done(p: Parsed, done: set[str]) -> bool:
    return p.key in done or _line_key(p.line) in done


def _key(rid, line) -> str:
    return _line_key(line) if rid is None else json.dumps(rid, ensure_ascii=False)


def _line_key(line) -> str:
    return f"@line {line}"


def parse_requests(path: str):
    """Yields Parsed for every non-empty line; bad lines become errors naming the line. Lines end at
    a newline byte only (JSON strings may hold any other line separator)."""
    seen: dict[str, int] = {}
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as e:
                yield Parsed(n, _line_key(n), None, error=f"{where}: not UTF-8 text (byte {e.start + 1} of the line)")
                continue
            if not text.strip():
                continue
            try:
                rec = json.loads(text.rstrip("\r\n"))  # columns of the line, not of "line\n"
            except json.JSONDecodeError as e:
                yield Parsed(n, _key(None, n), None, error=f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(rec, dict):
                yield Parsed(n, _key(None, n), None, error=f"{where}: a request must be a JSON object")
                continue
            rid = rec.get("id")
            if rid is None or not isinstance(rid, (str, int)) or isinstance(rid, bool):
                yield Parsed(n, _key(None, n), None, error=f"{where}: no \"id\" (a string or an integer)")
                continue
            key = _key(rid, n)
            if key in seen:
                yield Parsed(n, _line_key(n), rid, error=f"{where}: id {rid!r} again (first on line {seen[key]})")
                continue
            seen[key] = n
            yield Parsed(n, key, rid, request=rec)


# -------------------------------------------------------------------------- one request

class _Requests:
    """Turns parsed lines into engine requests (prompt ids, sampling, images) or error records."""

    def __init__(self, job: GenerateJob, tok, cfg, engine: Engine, score_ids: list[int]):
        from megatron_tanuki.data import templates
        from megatron_tanuki.models import registry

        self.job, self.tok, self.cfg, self.engine = job, tok, cfg, engine
        self.vision = hasattr(cfg, "vision")
        self.template = templates.get(job.chat or registry.architecture_of(cfg).default_chat)
        self.folder = os.path.dirname(os.path.abspath(job.input))
        self.score_ids = score_ids

    def build(self, p: Parsed):
        """(key, prompt ids, SamplingOptions, images) or raises RequestError."""
        from megatron_tanuki.data import templates
        from megatron_tanuki.data.images import ImageError, load_image, preprocess

        rec, where = p.request, f"{self.job.input}:{p.line} (id {p.id!r})"
        if ("prompt" in rec) == ("messages" in rec):
            raise RequestError(f"{where}: give exactly one of \"prompt\" and \"messages\"")
        if "prompt" in rec:
            if not isinstance(rec["prompt"], str):
                raise RequestError(f"{where}: \"prompt\" must be a string")
            turns = [("user", rec["prompt"])]
        else:
            try:
                turns = templates.message_turns(rec["messages"], where)
            except templates.ConversationError as e:
                raise RequestError(str(e)) from None
        images = []
        if rec.get("image") is not None:
            if not self.vision:
                raise RequestError(f"{where}: \"image\" given but {self.cfg.name} has no vision tower")
            path = rec["image"]
            if not isinstance(path, str):
                raise RequestError(f"{where}: \"image\" must be a file path")
            path = path if os.path.isabs(path) else os.path.join(self.folder, path)
            try:
                images.append(preprocess(load_image(path, where), self.cfg.image_size))
            except ImageError as e:
                raise RequestError(str(e)) from None
            first_user = next((k for k, (r, _) in enumerate(turns) if r == "user"), None)
            if first_user is not None and not any(templates.IMAGE_MARK in t for r, t in turns if r == "user"):
                turns[first_user] = ("user", templates.IMAGE_MARK + "\n" + turns[first_user][1])
            if self.job.prompt_logprobs:  # megatron-core's prompt log-probs index the vocabulary by
                # every prompt id, and image positions carry marker ids beyond it
                raise RequestError(f"{where}: --prompt-logprobs is not available for requests with an image")
        try:
            template = self.template
            if self.template.name == "none":
                ids = templates.encode_text(self.tok, "".join(t for _, t in turns), self.vision)[0]
            else:
                ids = templates.prompt_ids(self.tok, template, turns)
        except (templates.ConversationError, ValueError) as e:
            raise RequestError(f"{where}: {e}") from None
        return p.key, ids, self.sampling(rec, where), images

    def sampling(self, rec: dict, where: str) -> SamplingOptions:
        job = self.job
        opts = SamplingOptions(max_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                               top_k=job.top_k, stop=tuple(job.stop), logprobs=job.logprobs,
                               score_tokens=tuple(self.score_ids))
        for name, kind in SAMPLING_FIELDS.items():
            if rec.get(name) is None:
                continue
            value = rec[name]
            ok = isinstance(value, bool) if kind is bool else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (kind is float or value == int(value)))
            if not ok:
                raise RequestError(f"{where}: \"{name}\" must be {kind.__name__}, got {value!r}")
            setattr(opts, name, kind(value))
        if rec.get("stop") is not None:
            stop = rec["stop"]
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
                raise RequestError(f"{where}: \"stop\" must be a string or a list of non-empty strings")
            opts.stop = tuple(stop)
        opts.stop = tuple(dict.fromkeys(opts.stop + self.template.stop))  # the template's end-of-turn marks
        if opts.max_tokens < 1:
            raise RequestError(f"{where}: \"max_tokens\" must be at least 1")
        if opts.temperature < 0 or not (0 < opts.top_p <= 1) or opts.top_k < 0:
            raise RequestError(f"{where}: temperature >= 0, 0 < top_p <= 1 and top_k >= 0 are required")
        return opts


# -------------------------------------------------------------------------- output

def record(c: Completion, rid, line: int | None, score_names=(), logprobs: bool = False) -> dict:
    out = {"id": rid, "text": c.text, "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
           "completion_tokens": c.completion_tokens}
    if c.error is not None:
        out["error"] = c.error
        out["line"] = line
    if c.scores is not None:
        out["scores"] = dict(zip(score_names, c.scores))
    if c.prompt_logprobs is not None:
        out["prompt_logprobs"] = c.prompt_logprobs
    if logprobs and c.logprobs is not None:
        out["logprobs"] = c.logprobs
    return out


class Progress:
    """requests done / total, output tokens/s, requests in flight, KV cache use (rank 0)."""

    def __init__(self, total: int, enabled: bool | None):
        from tqdm import tqdm

        from megatron_tanuki.runtime.progress import progress_disabled

        self.bar = tqdm(total=total, desc="generate", unit="req", file=sys.stderr, disable=progress_disabled(enabled),
                        mininterval=0.5, dynamic_ncols=True)
        self.t0, self.tokens = time.perf_counter(), 0

    def update(self, done: int, tokens: int, engine: Engine) -> None:
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.t0)
        self.bar.set_postfix_str(f"{rate:.1f} tok/s, {engine.in_flight} in flight, KV {100 * engine.kv_usage():.0f}%",
                                 refresh=False)
        self.bar.update(done)

    def close(self) -> None:
        self.bar.close()


# -------------------------------------------------------------------------- the job

def _groups():
    """(this rank's request group, number of groups, writes?) from megatron-core's groups: ranks
    that differ only in TP, PP or EP position step together on the same requests."""
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ep = ps.get_expert_model_parallel_world_size()
    ep_in_dp = max(1, ep // max(1, ps.get_tensor_model_parallel_world_size() // ps.get_expert_tensor_parallel_world_size()))
    ep_in_dp = min(ep_in_dp, dp)
    group, groups = dp_rank // ep_in_dp, dp // ep_in_dp
    if ep > 1:  # every rank of an expert-parallel group must step on the same requests
        import torch.distributed as dist

        seen = [None] * ep
        dist.all_gather_object(seen, group, group=ps.get_expert_model_parallel_group())
        if len(set(seen)) != 1:
            raise RuntimeError(f"expert-parallel ranks fall into different request groups {seen}")
    writer = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0 \
        and dp_rank % ep_in_dp == 0
    return group, groups, writer


def checkpoint_tokenizer(ckpt: str) -> str | None:
    """The tokenizer converted with the checkpoint, when the user gives none -- for architectures that
    bring their own (Nemotron-4); Tanuki checkpoints keep the shipped Tanuki tokenizer."""
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.checkpoint_meta import MetaError, read_meta, resolve, tokenizer_path

    try:
        folder = resolve(ckpt)
        if not registry.architecture_of(read_meta(folder).config).own_tokenizer:
            return None
        return tokenizer_path(folder)
    except (FileNotFoundError, MetaError):
        return None


def load_model(job, reward: bool = False):
    """(cfg, chunks, hf_vocab) on this rank: the checkpoint's architecture in the job's layout.
    ``job``: anything with ``ckpt``, ``tp``, ``pp``, ``ep``, ``dtype`` (GenerateJob, ServeOptions).
    ``reward``: a reward model is wanted (score-reward); else one is refused (it outputs no logits)."""
    from megatron_tanuki.convert.verify import load_checkpoint
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.checkpoint_meta import read_meta, resolve
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed

    ckpt = resolve(job.ckpt)
    cfg, dtype, hf_vocab = read_meta(ckpt)
    if bool(getattr(cfg, "reward_outputs", 0)) != reward:
        raise ValueError(f"{job.ckpt}: {cfg.name} has no reward head (score-reward needs a reward model, e.g. "
                         f"Nemotron-4-340B-Reward)" if reward else
                         f"{job.ckpt}: {cfg.name} is a reward model (it scores, it does not generate): use "
                         f"`tanuki score-reward`")
    llm = registry.language_model(cfg)
    layout = ParallelLayout(tp=job.tp, pp=job.pp, ep=job.ep, sp=llm.is_moe and job.tp > 1)
    init_distributed(layout, llm)
    name = job.dtype or {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, "bf16")
    if name == "fp32" and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    fp8 = getattr(job, "fp8", None)
    if fp8:
        name = "bf16"  # FP8 weights and GEMMs; the rest (norms, embeddings, activations) in bf16
    # FP8 weights: the tensorwise recipe quantizes each weight from its own amax when the checkpoint is
    # copied in (delayed scaling would keep the initial scale of 1: nothing re-quantizes in inference).
    # no_grad: TE would otherwise keep a host copy of every FP8 weight's initial value.
    opts = BuildOptions(dtype=name, fp8=fp8, fp8_recipe="tensorwise" if fp8 else "delayed", fp8_param=bool(fp8),
                        perform_initialization=False)
    with torch.no_grad():
        chunks = registry.build(cfg, layout, opts)
    load_checkpoint(chunks, ckpt)
    return cfg, chunks, hf_vocab


def generate_rank(job: GenerateJob) -> dict:
    """One rank of `tanuki generate`; returns counts (rank 0's are the job's)."""
    import torch.distributed as dist

    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.models import registry

    t0 = time.perf_counter()
    cfg, chunks, hf_vocab = load_model(job)
    tok = load_tokenizer(job.tokenizer or checkpoint_tokenizer(job.ckpt))
    rank0 = dist.get_rank() == 0
    llm = registry.language_model(cfg)
    score_ids = _score_ids(tok, job.score)
    if job.max_seq_len is not None and job.max_seq_len > llm.max_position_embeddings:
        raise ValueError(f"--max-seq-len {job.max_seq_len} exceeds {cfg.name}'s max_position_embeddings "
                         f"{llm.max_position_embeddings}")
    options = EngineOptions(max_sequence_length=job.max_seq_len or llm.max_position_embeddings,
                            kv_memory_gb=job.kv_memory_gb, max_tokens=job.max_tokens_per_step, seed=job.seed,
                            prompt_logprobs=bool(job.score and job.prompt_logprobs))
    engine = Engine(chunks, tok, options, vocab_limit=min(tok.vocab_size, hf_vocab),
                    log=print if rank0 else (lambda *_: None))
    group, groups, writes = _groups()
    box = [read_done(job.output) if rank0 else None]
    dist.broadcast_object_list(box, src=0)  # one view of what is done, before anyone appends
    done = box[0]
    mine = [p for i, p in enumerate(parse_requests(job.input)) if i % groups == group and not is_done(p, done)]
    writer = Writer(job.output) if writes else None
    progress = Progress(len(mine), job.progress if rank0 else False)
    builder = _Requests(job, tok, cfg, engine, score_ids)
    by_key = {p.key: p for p in mine}
    counts = {"requests": len(mine), "skipped": len(done), "errors": 0, "completion_tokens": 0}

    def emit(c: Completion, from_engine: bool = False) -> None:
        p = by_key[c.key]
        if c.error is not None:
            counts["errors"] += 1
            if from_engine:  # the engine's reasons do not know the input file: name the line here
                c.error = f"{job.input}:{p.line} (id {p.id!r}): {c.error}"
        counts["completion_tokens"] += c.completion_tokens
        if writer is not None:
            writer.write(record(c, p.id, p.line, job.score, job.logprobs))
        progress.update(1, c.completion_tokens, engine)

    def requests():
        for p in mine:
            if p.error is not None:
                emit(Completion(key=p.key, finish_reason="error", error=p.error))
                continue
            try:
                yield builder.build(p)
            except RequestError as e:
                emit(Completion(key=p.key, finish_reason="error", error=str(e)))

    try:
        for c in engine.run(requests()):
            emit(c, from_engine=True)
    finally:
        progress.close()
        if writer is not None:
            writer.close()
    counts.update(steps=engine.steps, seconds=round(time.perf_counter() - t0, 2), backend=engine.backend)
    return counts


def _score_ids(tok, words) -> list[int]:
    ids = []
    for w in words:
        enc = tok.encode(w)
        if len(enc) != 1:
            raise ValueError(f"--score {w!r}: encodes to {len(enc)} tokens {enc}; each scored answer must be "
                             "one token (try it with or without a leading space)")
        ids.append(enc[0])
    return ids


def check_fp8(fp8: str | None) -> None:
    """--fp8 is refused up front where Transformer Engine cannot run it (no GPU, or TE not installed)."""
    if fp8 is None:
        return
    from megatron_tanuki.models import specs
    from megatron_tanuki.models.tanuki.builder import FP8_FORMATS

    if fp8 not in FP8_FORMATS:
        raise ValueError(f"--fp8 {fp8!r}: one of {', '.join(FP8_FORMATS)}")
    if not specs.te_available():
        why = ("no GPU" if not specs.cpu.gpu_present() else "TANUKI_TE=0 set" if os.environ.get("TANUKI_TE") == "0"
               else "no Transformer Engine")
        raise ValueError(f"--fp8 {fp8}: FP8 needs Transformer Engine on a GPU (pip install megatron_tanuki[te]); "
                         f"this machine has {why}")


def check_job(job: GenerateJob) -> None:
    """The options' mistakes, found before any rank starts or a model is loaded."""
    from megatron_tanuki.data import templates
    from megatron_tanuki.data.tokenizer import load_tokenizer

    if not os.path.isfile(job.input):
        raise FileNotFoundError(2, "input file not found", job.input)
    if os.path.isdir(job.output):
        raise ValueError(f"--output {job.output}: is a folder; give the JSONL file to append to")
    if os.path.exists(job.output) and os.path.samefile(job.input, job.output):
        raise ValueError(f"--output {job.output}: is the input file; answers go to another file")
    if job.chat is not None:
        templates.get(job.chat)
    if job.max_tokens < 1:
        raise ValueError(f"--max-tokens {job.max_tokens}: must be at least 1")
    if not (job.temperature >= 0 and 0 < job.top_p <= 1 and job.top_k >= 0):
        raise ValueError(f"--temperature {job.temperature} --top-p {job.top_p} --top-k {job.top_k}: "
                         "temperature >= 0, 0 < top_p <= 1 and top_k >= 0 are required")
    if job.max_seq_len is not None and job.max_seq_len < 2:
        raise ValueError(f"--max-seq-len {job.max_seq_len}: must be at least 2")
    if job.max_tokens_per_step < 64 or job.max_tokens_per_step % 64:
        raise ValueError(f"--max-tokens-per-step {job.max_tokens_per_step}: must be a positive multiple of 64 "
                         "(megatron-core pads prefill to 64 tokens)")
    if job.kv_memory_gb is not None and not job.kv_memory_gb > 0:
        raise ValueError(f"--kv-memory-gb {job.kv_memory_gb}: must be positive")
    check_fp8(job.fp8)
    if job.fp8 and job.dtype == "fp32":
        raise ValueError(f"--fp8 {job.fp8} with --dtype fp32: FP8 runs with bf16 around it; drop --dtype")
    if job.prompt_logprobs and not job.score:
        raise ValueError("--prompt-logprobs works with --score (scoring runs only)")
    if job.score:
        _score_ids(load_tokenizer(job.tokenizer or checkpoint_tokenizer(job.ckpt)), job.score)


def run(job: GenerateJob) -> list:
    """Under torchrun/srun: this rank; else ``nproc`` local ranks (default TP*PP*EP)."""
    from megatron_tanuki.runtime.spawn import run_job

    check_job(job)
    return run_job(generate_rank, job, job.nproc or job.tp * job.pp * job.ep)
