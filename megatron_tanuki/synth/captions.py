"""`tanuki synth captions`: a vision model answers a recipe's questions about every image of a folder
(or a JSONL list), and the answers become the LLaVA JSON that `tanuki train` vlm_stage1/2 reads as is.

Every (image, question) pair is one request, and all of them go through the engine at its capacity
(continuous batching, many images in flight): the seed team's VLM data took a week of 8 x H100
because their inference took one image at a time. Each question is asked about the image on its own
(no earlier answer in the prompt), so an image's questions run in parallel, and a stage-2
conversation is the recipe's questions in order with their answers -- as in LLaVA's instruction data,
where every turn is answerable from the picture alone.

Rules as in `tanuki synth run`: an empty answer, one cut by max_tokens (unless ``allow_truncated``)
or one holding ``<image>`` is asked again with a new derived seed up to ``retries`` times, then
recorded in rejects.jsonl with the reason. A request the model cannot take (an unreadable image, a
prompt longer than the context) is rejected at once, naming the file: asking again fails alike. Any
other engine error is the engine's, not the answer's: it is counted (summary ``failed``) and written
nowhere, so the rerun asks it again.

    OUT/recipe.yaml        the recipe as last run
    OUT/answers.jsonl      one line per answer, appended whole (fsync) while running
    OUT/rejects.jsonl      answers given up on: image, question, reason, attempts, every failure
    OUT/llava_stage1.json  [{"id", "image", "conversations": [human "<image>\\n" + the stage-1 question,
                           gpt answer]}]: one caption per image (vlm_stage1, `plain` template)
    OUT/llava_stage2.json  the same images, every answered question as one multi-turn conversation
                           (vlm_stage2, `v1`); only the first human turn carries "<image>"
    OUT/summary.json

Crash safety: an answer is done once its line is in answers.jsonl or rejects.jsonl (a torn last line
is cut first); a rerun asks only the rest (remove rejects.jsonl to ask those again). An answer's id
covers the image, the question's name and what decides its text (prompt, sampling, stop, chat, the
model that loads -- captions.model.name when set, else the checkpoint folder -- and a --tokenizer),
so editing one question redoes only it and another --ckpt asks everything again. The LLaVA files are rebuilt from the answer lines
once nothing is left to ask (temp + rename): a killed run never leaves a half-written or partial
dataset. Image paths in them are relative to the image folder (the images folder, or the JSONL's
folder): set `data.image_folder` to it.

Where things are: captions_spec.py reads the recipe's captions: section and the image list (all
checked before a model loads); llava.py writes the LLaVA files; this module asks.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time
from dataclasses import dataclass, field

from megatron_tanuki.synth.backend import TurnRequest
from megatron_tanuki.synth.captions_spec import (ANSWERS, IMAGE_MARK, REJECTS, STAGE1, STAGE2, SUMMARY, Image, Plan,
                                                 Question, answer_id, identify, list_images, load_captions,
                                                 write_atomic)
from megatron_tanuki.synth.llava import assemble
from megatron_tanuki.synth.recipe import turn_seed


# -------------------------------------------------------------------------- the job

@dataclass
class CaptionJob:
    recipe: str
    images: str | None = None     # overrides captions.images
    out: str | None = None        # overrides captions.out
    ckpt: str | None = None       # overrides captions.model.ckpt
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dtype: str | None = None
    fp8: str | None = None
    tokenizer: str | None = None
    kv_memory_gb: float | None = None
    max_seq_len: int | None = None
    max_tokens_per_step: int = 8192
    limit: int | None = None      # at most the first N images
    progress: bool | None = None
    grace_s: float = 120.0        # after SIGTERM/SIGUSR1: time the answers in flight get
    nproc: int | None = None


def plan(job: CaptionJob) -> Plan:
    """Every mistake found before a model loads: the recipe, the images, the output, the checkpoint."""
    recipe = load_captions(job.recipe)
    source, out, ckpt = job.images or recipe.images, job.out or recipe.out, job.ckpt or recipe.ckpt
    for value, flag, key in ((source, "--images", "images"), (out, "--out", "out"), (ckpt, "--ckpt", "model.ckpt")):
        if not value:
            raise ValueError(f"{recipe.path}: no captions.{key}: set it in the recipe or give {flag}")
    if job.limit is not None and job.limit < 1:
        raise ValueError(f"--limit {job.limit}: must be at least 1")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a folder")
    folder, images = list_images(source)
    images = images[:job.limit] if job.limit else images
    # the answers' ids are the loaded model's (see identify): --ckpt and --tokenizer count
    identify(recipe, ckpt, None if recipe.model_name else _loaded(ckpt), job.tokenizer)
    p = Plan(recipe, out, ckpt, folder, images, job.tokenizer)
    p.work = [(answer_id(im, q), im, q) for im in images for q in recipe.questions]
    return p


def _loaded(ckpt: str) -> str:
    """The checkpoint folder that loads for ``ckpt`` (a run folder's latest iteration)."""
    from megatron_tanuki.models.checkpoint_meta import resolve

    return resolve(ckpt)


def check_model(ckpt: str) -> None:
    from megatron_tanuki.models.checkpoint_meta import read_meta, resolve

    cfg = read_meta(resolve(ckpt)).config
    if not hasattr(cfg, "vision"):
        raise ValueError(f"{ckpt}: {cfg.name} has no vision tower; captions need a vision model (Tanuki-vision)")


def run_captions(recipe_path: str, *, images: str | None = None, out: str | None = None, ckpt: str | None = None,
                 tp: int = 1, pp: int = 1, ep: int = 1, limit: int | None = None, kv_memory_gb: float | None = None,
                 max_seq_len: int | None = None, progress: bool | None = None, **more) -> dict:
    """`tanuki synth captions`: ask what is not yet answered, then write the LLaVA files; returns the
    summary. ``more``: the other CaptionJob fields (dtype, fp8, tokenizer, max_tokens_per_step, grace_s)."""
    job = CaptionJob(recipe_path, images=images, out=out, ckpt=ckpt, tp=tp, pp=pp, ep=ep, limit=limit,
                     kv_memory_gb=kv_memory_gb, max_seq_len=max_seq_len, progress=progress, **more)
    p = plan(job)
    if not _todo(p, done_ids(p.out, repair=False)):  # nothing to ask: no model is loaded
        return _finish(p, _Stats(len(p.work), len(p.work)), loaded=False)
    check_model(p.ckpt)
    from megatron_tanuki.runtime.spawn import run_job

    return run_job(captions_rank, job, job.tp * job.pp * job.ep)[0]


def captions_rank(job: CaptionJob) -> dict:
    """One rank: every rank asks the same requests in the same order (the engine steps them
    together); rank 0 writes."""
    import signal

    from megatron_tanuki.synth.job import engine_backend
    from megatron_tanuki.synth.runner import StopFlag

    p = plan(job)
    job.ckpt = p.ckpt
    backend = engine_backend(job, p.recipe.chat, where=p.recipe.path)
    stop = StopFlag()
    previous = stop.install()
    try:
        return answer_rest(p, backend, stop, job.grace_s, job.progress)
    finally:
        backend.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def answer_rest(p: Plan, backend, stop, grace_s: float = 120.0, progress: bool | None = None) -> dict:
    """Ask ``backend`` (any teacher backend; the engine's ranks all call this alike) every answer of
    ``p`` not yet in answers.jsonl or rejects.jsonl, append each as it is decided (rank 0), then
    write the summary and, when nothing is left, the LLaVA files. Returns the summary."""
    import torch.distributed as dist

    ranks = dist.is_initialized()
    rank0 = not ranks or dist.get_rank() == 0
    output = None
    try:
        if rank0:
            write_atomic(os.path.join(p.out, "recipe.yaml"), p.recipe.text)
        box = [done_ids(p.out, repair=True) if rank0 else None]
        if ranks and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)   # one view of what is done, before anyone appends
        todo = _todo(p, box[0])
        output = _Output(p.out) if rank0 else None
        stats = _Stats(len(p.work), len(p.work) - len(todo))
        ask(p, todo, backend, output, stats, stop, grace_s, progress if rank0 else False)
    finally:
        if output is not None:
            output.close()
    return _finish(p, stats, loaded=True, write=rank0)


def done_ids(out: str, repair: bool) -> set[str]:
    from megatron_tanuki.synth.store import read_ids

    done = set()
    for name in (ANSWERS, REJECTS):
        path = os.path.join(out, name)
        if os.path.exists(path):
            done |= read_ids(path, repair=repair)
    return done


def _todo(p: Plan, done: set[str]) -> list:
    return [w for w in p.work if w[0] not in done]


# -------------------------------------------------------------------------- asking

class _Output:
    def __init__(self, out: str):
        from megatron_tanuki.inference.generate import Writer

        self.answers, self.rejects = Writer(os.path.join(out, ANSWERS)), Writer(os.path.join(out, REJECTS))

    def close(self) -> None:
        self.answers.close()
        self.rejects.close()


class _Stats:
    def __init__(self, target: int, skipped: int):
        self.t0 = time.monotonic()
        self.target, self.skipped = target, skipped
        self.answered = self.rejected = self.retried = self.peak = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.reasons = collections.Counter()
        self.stopped = False
        self.abandoned = 0
        self.failed = 0               # engine errors other than a refused request: left for the rerun

    def elapsed(self) -> float:
        return max(1e-9, time.monotonic() - self.t0)


@dataclass
class _Ask:
    aid: str
    image: Image
    q: Question
    attempt: int = 0
    failures: list[str] = field(default_factory=list)

    def request(self, key: str) -> TurnRequest:
        s = self.q.sampling
        return TurnRequest(key=key, messages=[{"role": "user", "content": self.q.prompt}],
                           temperature=float(s["temperature"]), top_p=float(s["top_p"]),
                           max_tokens=int(s["max_tokens"]), stop=self.q.stop,
                           seed=turn_seed(self.aid, self.q.name, self.attempt), images=(self.image.path,))


def ask(p: Plan, todo: list, backend, output: _Output | None, stats: _Stats, stop, grace_s: float = 120.0,
        progress: bool | None = None) -> _Stats:
    """Keep the backend at capacity with the todo answers (retries first), write each as it is
    decided. After a stop request nothing new is submitted; the answers in flight get ``grace_s``."""
    from megatron_tanuki.runtime.progress import progress_disabled

    fresh = collections.deque(_Ask(aid, im, q) for aid, im, q in todo)
    retry: collections.deque[_Ask] = collections.deque()
    pending: dict[str, _Ask] = {}
    agree = getattr(backend, "agree", lambda *flags: flags)
    show, last, serial = not progress_disabled(progress), time.monotonic(), 0
    stopping = expired = False
    log = print if output is not None else (lambda *_: None)
    while True:
        while not stopping and (retry or fresh) and backend.capacity() > 0:
            a = retry.popleft() if retry else fresh.popleft()
            serial += 1
            key = f"{serial}:{a.q.name}:{a.attempt}"
            pending[key] = a
            backend.submit(a.request(key))
        stats.peak = max(stats.peak, len(pending))
        if not pending and (stopping or not (retry or fresh)):
            break
        for res in backend.poll(0.2):
            a = pending.pop(res.key, None)
            if a is None:
                continue
            stats.prompt_tokens += res.prompt_tokens
            stats.completion_tokens += res.completion_tokens
            text, why, kind = _check(a.q, res)
            if why is None:
                stats.answered += 1
                if output is not None:
                    output.answers.write(_answer_record(p, a, res, text))
                continue
            stats.reasons[kind] += 1
            if res.finish_reason == "error" and kind != "request":
                # the engine failed, not the answer (as ABANDON in `tanuki synth run`): written
                # nowhere, so the rerun asks it again; only a refused request is a reject
                stats.failed += 1
                if stats.failed == 1:
                    log(f"[captions] engine error, left for the rerun: {why}", flush=True)
                continue
            a.failures.append(why)
            if kind == "request" or a.attempt >= p.recipe.retries:
                stats.rejected += 1
                if output is not None:
                    output.rejects.write(_reject_record(p, a))
            else:
                a.attempt += 1
                stats.retried += 1
                retry.append(a)
        now = stop.requested
        was = stopping
        stopping, expired = agree(now, now and time.monotonic() - stop.at > grace_s)
        if stopping and not was:
            log(f"[captions] stop requested: nothing new is asked; {len(pending)} answer(s) in flight get "
                f"{grace_s:.0f} s, the rest are asked by the rerun", flush=True)
        if expired:
            break
        if show and time.monotonic() - last >= 10:
            last = time.monotonic()
            print(_line(stats, len(pending)), file=sys.stderr, flush=True)
    stats.stopped = stopping
    stats.abandoned = len(pending) + len(retry) + len(fresh)
    return stats


def _check(q: Question, res) -> tuple[str, str | None, str | None]:
    """(answer, why it fails, the failure's kind); kind "request": asking again is pointless."""
    if res.finish_reason == "error":
        error = (res.error or "error").removeprefix(f"{res.key}: ")
        if res.error_kind == "request":
            return "", error, "request"
        kind = f"backend error ({res.error_kind or 'error'})"
        return "", f"{kind}: {error}", kind
    text = res.text.strip()
    if not text:
        return "", "empty answer", "empty answer"
    if res.finish_reason == "length" and not q.allow_truncated:
        return "", f"truncated at max_tokens {q.sampling['max_tokens']}", "truncated"
    if IMAGE_MARK in text:
        return "", f"the answer holds {IMAGE_MARK} (it would be read as an image position)", "image mark"
    return text, None, None


def _answer_record(p: Plan, a: _Ask, res, text: str) -> dict:
    return {"id": a.aid, "image_id": a.image.id, "image": a.image.image, "question": a.q.name,
            "category": a.q.category, "prompt": a.q.prompt, "answer": text, "finish_reason": res.finish_reason,
            "model": p.recipe.model, "ckpt": os.path.abspath(p.ckpt), "recipe": p.recipe.name,
            "question_hash": a.q.hash,
            "sampling": {**a.q.sampling, "stop": list(a.q.stop)}, "seed": turn_seed(a.aid, a.q.name, a.attempt),
            "attempts": a.attempt + 1, "prompt_tokens": res.prompt_tokens,
            "completion_tokens": res.completion_tokens, "created": _now()}


def _reject_record(p: Plan, a: _Ask) -> dict:
    return {"id": a.aid, "image_id": a.image.id, "image": a.image.image, "path": a.image.path,
            "question": a.q.name, "reason": a.failures[-1], "attempts": len(a.failures),
            "failures": list(a.failures), "seeds": [turn_seed(a.aid, a.q.name, k) for k in range(len(a.failures))],
            "model": p.recipe.model, "ckpt": os.path.abspath(p.ckpt), "recipe": p.recipe.name, "created": _now()}


def _line(s: _Stats, in_flight: int) -> str:
    el = s.elapsed()
    finished = s.answered + s.rejected + s.failed
    remaining = s.target - s.skipped - finished
    eta = f"{remaining / (finished / el):.0f} s" if finished else "?"
    return (f"[captions] {s.skipped + finished}/{s.target} answers | {in_flight} in flight | "
            f"{s.completion_tokens / el:.0f} tok/s | rejects {s.rejected} retries {s.retried} | ETA {eta}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -------------------------------------------------------------------------- the summary

def _finish(p: Plan, stats: _Stats, loaded: bool, write: bool = True) -> dict:
    el = stats.elapsed()
    left = stats.abandoned + stats.failed
    summary = {"recipe": p.recipe.name, "model": p.recipe.model, "ckpt": os.path.abspath(p.ckpt),
               "images": len(p.images),
               "questions": len(p.recipe.questions), "target": stats.target, "skipped": stats.skipped,
               "asked": stats.answered + stats.rejected, "answered": stats.answered, "rejected": stats.rejected,
               "retried": stats.retried, "failure_reasons": dict(stats.reasons), "failed": stats.failed, "left": left,
               "stopped": stats.stopped, "loaded_model": loaded, "seconds": round(el, 3),
               "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
               "tokens_per_s": round(stats.completion_tokens / el, 2), "peak_in_flight": stats.peak,
               "out": os.path.abspath(p.out), "image_folder": p.folder,
               "stage1": None, "stage2": None}
    if not write:
        return summary
    os.makedirs(p.out, exist_ok=True)
    if not left:
        summary.update(assemble(p), stage1=os.path.abspath(os.path.join(p.out, STAGE1)),
                       stage2=os.path.abspath(os.path.join(p.out, STAGE2)))
    write_atomic(os.path.join(p.out, SUMMARY), json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    return summary
