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
prompt longer than the context) is rejected at once, naming the file: asking again fails alike.

    OUT/recipe.yaml        the recipe as last run
    OUT/answers.jsonl      one line per answer, appended whole (fsync) while running
    OUT/rejects.jsonl      answers given up on: image, question, reason, attempts, every failure
    OUT/llava_stage1.json  [{"id", "image", "conversations": [human "<image>\\n" + the stage-1 question,
                           gpt answer]}]: one caption per image (vlm_stage1, `plain` template)
    OUT/llava_stage2.json  the same images, every answered question as one multi-turn conversation
                           (vlm_stage2, `v1`); only the first human turn carries "<image>"
    OUT/summary.json

Two files, because the stages train different things: stage 1 aligns the projector on one caption
per image (the `plain` template keeps only the image and the caption), stage 2 teaches dialogue.
With ``seq_length`` (the training's data.seq_length) every record is built by our own SampleBuilder
first: a stage-2 conversation that does not fit becomes several records of the same image, an answer
too long on its own is left out and counted (training would skip such a record as bad, and stop
past data.max_bad_records).

Crash safety: an answer is done once its line is in answers.jsonl or rejects.jsonl (a torn last line
is cut first); a rerun asks only the rest (remove rejects.jsonl to ask those again). An answer's id
covers the image, the question's name and what decides its text (prompt, sampling, stop, model,
chat), so editing one question redoes only it. The LLaVA files are rebuilt from the answer lines
once nothing is left to ask (temp + rename): a killed run never leaves a half-written or partial
dataset. Image paths in them are relative to the image folder (the images folder, or the JSONL's
folder): set `data.image_folder` to it.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field


from megatron_tanuki.synth.backend import TurnRequest
from megatron_tanuki.synth.recipe import Reader, load_section, read_sampling, turn_seed

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_MARK = "<image>"
CAPTION_KEYS = {"images", "model", "questions", "sampling", "stop", "retries", "allow_truncated", "stage1", "out",
                "seq_length"}
MODEL_KEYS = {"name", "ckpt", "chat"}
QUESTION_KEYS = {"name", "prompt", "category", "sampling", "stop", "allow_truncated"}
DEFAULT_SAMPLING = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 512}
ANSWERS, REJECTS, STAGE1, STAGE2, SUMMARY = ("answers.jsonl", "rejects.jsonl", "llava_stage1.json",
                                             "llava_stage2.json", "summary.json")


# -------------------------------------------------------------------------- the recipe

@dataclass
class Question:
    name: str
    prompt: str
    category: str
    sampling: dict                # temperature, top_p, max_tokens
    stop: tuple[str, ...]
    allow_truncated: bool
    hash: str = ""                # what decides the answer's text (prompt, sampling, stop, model, chat)


@dataclass
class CaptionRecipe:
    name: str
    path: str
    text: str
    images: str | None            # the recipe's image source (relative to the working directory)
    out: str | None
    model: str                    # recorded with every answer; part of each question's hash
    ckpt: str | None
    chat: str | None              # None: the checkpoint's default (llava-v1 for Tanuki-vision)
    questions: list[Question]
    retries: int
    stage1: str                   # the question whose answers make the stage-1 file
    seq_length: int | None = None  # the training's data.seq_length: every record is made to fit it


def load_captions(path: str) -> CaptionRecipe:
    """The ``captions:`` section of a recipe, checked; errors name the file and ``captions.<field>``.

    A full synth recipe (teacher, seeds, turns) is read by the synth recipe loader first; a recipe
    that only makes captions holds ``name``, ``description`` and ``captions``."""
    recipe = load_section(path, "captions")
    r, name, section = Reader(recipe.path), recipe.name, recipe.section
    c = r.mapping(section, "captions", CAPTION_KEYS, required=("questions",))
    model = r.mapping(c.get("model") or {}, "captions.model", MODEL_KEYS)
    ckpt = r.string(model["ckpt"], "captions.model.ckpt") if model.get("ckpt") is not None else None
    chat = _chat(r, model.get("chat"))
    model_name = r.string(model["name"], "captions.model.name") if model.get("name") is not None else \
        os.path.basename(os.path.normpath(ckpt)) if ckpt else "vlm"
    defaults = read_sampling(r, c.get("sampling") or {}, "captions.sampling", DEFAULT_SAMPLING)
    stop = r.strings(c.get("stop"), "captions.stop")
    allow = _flag(r, c.get("allow_truncated", False), "captions.allow_truncated")
    retries = c.get("retries", 3)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise r.error("captions.retries", f"{retries!r}: an integer >= 0")
    questions = _questions(r, c["questions"], defaults, stop, allow)
    for q in questions:
        identity = {"prompt": q.prompt, "sampling": q.sampling, "stop": q.stop, "model": model_name, "chat": chat}
        q.hash = _digest(json.dumps(identity, sort_keys=True, ensure_ascii=False))
    stage1 = c.get("stage1", questions[0].name)
    if stage1 not in [q.name for q in questions]:
        raise r.error("captions.stage1", f"{stage1!r}: the name of one of captions.questions")
    images = r.string(c["images"], "captions.images") if c.get("images") is not None else None
    out = r.string(c["out"], "captions.out") if c.get("out") is not None else None
    seq = c.get("seq_length")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 2):
        raise r.error("captions.seq_length", f"{seq!r}: the training's data.seq_length, an integer")
    return CaptionRecipe(name=name, path=os.path.abspath(path), text=recipe.text, images=images, out=out, model=model_name,
                         ckpt=ckpt, chat=chat, questions=questions, retries=retries, stage1=stage1, seq_length=seq)


def _chat(r: Reader, value) -> str | None:
    if value is None:
        return None
    from megatron_tanuki.data import templates

    name = r.string(value, "captions.model.chat")
    try:
        template = templates.get(name)
    except ValueError as e:
        raise r.error("captions.model.chat", str(e)) from None
    if not template.images:
        raise r.error("captions.model.chat", f"the {name} template has no image position (use llava-v1 or plain)")
    return name


def _flag(r: Reader, value, where: str) -> bool:
    if not isinstance(value, bool):
        raise r.error(where, f"{value!r}: true or false")
    return value


def _questions(r: Reader, value, defaults: dict, stop: tuple, allow: bool) -> list[Question]:
    if not isinstance(value, list) or not value:
        raise r.error("captions.questions", "a non-empty list of {name, prompt, category?, sampling?}")
    out = []
    for i, spec in enumerate(value):
        where = f"captions.questions[{i}]"
        d = r.mapping(spec, where, QUESTION_KEYS, required=("name", "prompt"))
        name = r.string(d["name"], f"{where}.name")
        if not name.isidentifier() or name in [q.name for q in out]:
            raise r.error(f"{where}.name", f"{name!r}: an identifier no earlier question uses")
        prompt = r.string(d["prompt"], f"{where}.prompt").strip()
        if IMAGE_MARK in prompt:
            raise r.error(f"{where}.prompt", f"leave out {IMAGE_MARK}: the image is placed before the question")
        category = r.string(d.get("category", name), f"{where}.category")
        out.append(Question(name=name, prompt=prompt, category=category,
                            sampling=read_sampling(r, d.get("sampling") or {}, f"{where}.sampling", defaults),
                            stop=tuple(dict.fromkeys(stop + r.strings(d.get("stop"), f"{where}.stop"))),
                            allow_truncated=_flag(r, d.get("allow_truncated", allow), f"{where}.allow_truncated")))
    return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -------------------------------------------------------------------------- the images

@dataclass
class Image:
    id: str                       # the LLaVA record's id (unique)
    image: str                    # as the LLaVA files write it: relative to the image folder
    path: str                     # the file


def list_images(source: str) -> tuple[str, list[Image]]:
    """(image folder, images): a folder -> every .jpg/.jpeg/.png/.webp under it, recursively, sorted
    by relative path; a JSONL -> one ``{"image": PATH, "id"?: ...}`` a line, PATH relative to the
    JSONL's folder (or absolute)."""
    if os.path.isdir(source):
        folder = os.path.abspath(source)
        found = []
        for root, dirs, files in os.walk(folder):
            dirs.sort()
            found += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/") for f in files
                      if f.lower().endswith(IMAGE_EXTS)]
        images = [Image(rel, rel, os.path.join(folder, rel)) for rel in sorted(found)]
    elif os.path.isfile(source):
        folder = os.path.dirname(os.path.abspath(source))
        images = _jsonl_images(source, folder)
    else:
        raise FileNotFoundError(2, "images: no such folder or JSONL file", source)
    if not images:
        raise ValueError(f"{source}: no images ({', '.join(IMAGE_EXTS)} files or JSONL lines with \"image\")")
    return folder, images


def _jsonl_images(path: str, folder: str) -> list[Image]:
    images, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON line ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or not rec["image"]:
                raise ValueError(f"{where}: needs an \"image\" field (a file path)")
            rid = rec.get("id", rec["image"])
            if not isinstance(rid, (str, int)) or isinstance(rid, bool):
                raise ValueError(f"{where}: \"id\" must be a string or an integer")
            rid = str(rid)
            if rid in seen:
                raise ValueError(f"{where}: id {rid!r} again (first on line {seen[rid]})")
            seen[rid] = n
            images.append(Image(rid, rec["image"], os.path.join(folder, rec["image"])))
    return images


def answer_id(image: Image, q: Question) -> str:
    return _digest(f"{image.id}\0{q.name}\0{q.hash}")


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


@dataclass
class Plan:
    recipe: CaptionRecipe
    out: str
    ckpt: str
    folder: str
    images: list[Image]
    tokenizer: str | None = None
    work: list[tuple[str, Image, Question]] = field(default_factory=list)   # (answer id, image, question)


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
    p = Plan(recipe, out, ckpt, folder, images, job.tokenizer)
    p.work = [(answer_id(im, q), im, q) for im in images for q in recipe.questions]
    return p


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

    import torch.distributed as dist

    from megatron_tanuki.synth.job import engine_backend
    from megatron_tanuki.synth.runner import StopFlag

    p = plan(job)
    job.ckpt = p.ckpt
    backend = engine_backend(job, p.recipe.chat, where=p.recipe.path)
    rank0 = dist.get_rank() == 0
    stop = StopFlag()
    previous = stop.install()
    output = None
    try:
        if rank0:
            _write_atomic(os.path.join(p.out, "recipe.yaml"), p.recipe.text)
        box = [done_ids(p.out, repair=True) if rank0 else None]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)   # one view of what is done, before anyone appends
        todo = _todo(p, box[0])
        output = _Output(p.out) if rank0 else None
        stats = _Stats(len(p.work), len(p.work) - len(todo))
        ask(p, todo, backend, output, stats, stop, job.grace_s, job.progress if rank0 else False)
    finally:
        if output is not None:
            output.close()
        backend.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
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
            a.failures.append(why)
            stats.reasons[kind] += 1
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
            "model": p.recipe.model, "recipe": p.recipe.name, "question_hash": a.q.hash,
            "sampling": {**a.q.sampling, "stop": list(a.q.stop)}, "seed": turn_seed(a.aid, a.q.name, a.attempt),
            "attempts": a.attempt + 1, "prompt_tokens": res.prompt_tokens,
            "completion_tokens": res.completion_tokens, "created": _now()}


def _reject_record(p: Plan, a: _Ask) -> dict:
    return {"id": a.aid, "image_id": a.image.id, "image": a.image.image, "path": a.image.path,
            "question": a.q.name, "reason": a.failures[-1], "attempts": len(a.failures),
            "failures": list(a.failures), "seeds": [turn_seed(a.aid, a.q.name, k) for k in range(len(a.failures))],
            "model": p.recipe.model, "recipe": p.recipe.name, "created": _now()}


def _line(s: _Stats, in_flight: int) -> str:
    el = s.elapsed()
    finished = s.answered + s.rejected
    remaining = s.target - s.skipped - finished
    eta = f"{remaining / (finished / el):.0f} s" if finished else "?"
    return (f"[captions] {s.skipped + finished}/{s.target} answers | {in_flight} in flight | "
            f"{s.completion_tokens / el:.0f} tok/s | rejects {s.rejected} retries {s.retried} | ETA {eta}")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -------------------------------------------------------------------------- the LLaVA files

def assemble(p: Plan) -> dict:
    """Both LLaVA files from the answer lines (only answers of this recipe's questions as they are
    now, for these images, in image then question order). Returns the counts."""
    from megatron_tanuki.synth.store import iter_records

    wanted = {w[0] for w in p.work}
    answers = {}
    path = os.path.join(p.out, ANSWERS)
    if os.path.exists(path):
        answers = {rec["id"]: rec["answer"] for _, rec in iter_records(path) if rec.get("id") in wanted}
    fits = _fitter(p) if p.recipe.seq_length else (lambda stage, rec: True)
    first = next(q for q in p.recipe.questions if q.name == p.recipe.stage1)
    stage1, stage2, counts = [], [], collections.Counter()
    for im in p.images:
        turns = [(q, answers[aid]) for q in p.recipe.questions if (aid := answer_id(im, q)) in answers]
        stage2 += [_record(im, chunk, k) for k, chunk in enumerate(_split(im, turns, fits, counts))]
        caption = answers.get(answer_id(im, first))
        if caption is not None:
            rec = _record(im, [(first, caption)], 0)
            if fits(1, rec):
                stage1.append(rec)
            else:
                counts["stage1_over_long"] += 1
    for name, data in ((STAGE1, stage1), (STAGE2, stage2)):
        _write_atomic(os.path.join(p.out, name), json.dumps(data, ensure_ascii=False) + "\n")
    return {"stage1_records": len(stage1), "stage2_records": len(stage2),
            "stage2_turns": sum(len(r["conversations"]) // 2 for r in stage2), "seq_length": p.recipe.seq_length,
            **{k: counts[k] for k in ("stage1_over_long", "stage2_over_long_turns", "stage2_split_images")}}


def _record(im: Image, turns: list, part: int) -> dict:
    conv = []
    for k, (q, text) in enumerate(turns):
        conv += [{"from": "human", "value": (IMAGE_MARK + "\n" if k == 0 else "") + q.prompt},
                 {"from": "gpt", "value": text}]
    return {"id": im.id if part == 0 else f"{im.id}#{part + 1}", "image": im.image, "conversations": conv}


def _split(im: Image, turns: list, fits, counts) -> list[list]:
    """An image's turns as conversations that fit: one when they do (the usual case); else in order,
    a new record of the same image when the next turn would not fit; a turn too long on its own is
    left out (counted)."""
    if not turns or fits(2, _record(im, turns, 0)):
        return [turns] if turns else []
    chunks, cur = [], []
    for t in turns:
        if fits(2, _record(im, cur + [t], 0)):
            cur.append(t)
            continue
        if cur:
            chunks.append(cur)
        cur = [t] if fits(2, _record(im, [t], 0)) else []
        counts["stage2_over_long_turns"] += not cur
    chunks += [cur] if cur else []
    counts["stage2_split_images"] += len(chunks) > 1
    return chunks


def _fitter(p: Plan):
    """fits(stage, record): `tanuki train` builds the record within seq_length -- asked of our own
    SampleBuilder, with the templates vlm_stage1 / vlm_stage2 use (plain, v1) and the model's image
    positions."""
    from megatron_tanuki.data.samples import SampleBuilder, SampleError
    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.inference.generate import checkpoint_tokenizer
    from megatron_tanuki.models.checkpoint_meta import read_meta, resolve

    positions = read_meta(resolve(p.ckpt)).config.num_image_tokens
    tok = load_tokenizer(p.tokenizer or checkpoint_tokenizer(p.ckpt))
    builders = {stage: SampleBuilder("llava", template, tok, p.recipe.seq_length, p.folder, positions)
                for stage, template in ((1, "plain"), (2, "v1"))}

    def fits(stage: int, rec: dict) -> bool:
        try:
            builders[stage](rec, f"{p.out}: image {rec['id']!r}")
        except SampleError as e:
            if e.kind != "over-long sample":
                raise
            return False
        return True

    return fits


def _finish(p: Plan, stats: _Stats, loaded: bool, write: bool = True) -> dict:
    el = stats.elapsed()
    left = stats.abandoned
    summary = {"recipe": p.recipe.name, "model": p.recipe.model, "images": len(p.images),
               "questions": len(p.recipe.questions), "target": stats.target, "skipped": stats.skipped,
               "asked": stats.answered + stats.rejected, "answered": stats.answered, "rejected": stats.rejected,
               "retried": stats.retried, "failure_reasons": dict(stats.reasons), "left": left,
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
    _write_atomic(os.path.join(p.out, SUMMARY), json.dumps(summary, ensure_ascii=False, indent=1) + "\n")
    return summary


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
