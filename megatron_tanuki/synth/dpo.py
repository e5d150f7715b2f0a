"""`tanuki synth dpo RECIPE`: preference pairs from a policy's answers and a judge's verdicts.

Why this shape: a DPO pair is only worth training on when the judge's preference is real, and LLM
judges favour a position. So a policy model (Tanuki SFT) writes 2 answers per question (each with
its own derived seed), the judge (the teacher) compares them twice with the order swapped -- the
MT-Bench pairwise format, temperature 0 -- and only a consistent verdict (the same answer wins in
both orders) becomes ``{"id", "prompt", "chosen", "rejected", "judge"}``. Ties, inconsistent and
unparseable verdicts, identical, empty or truncated answers go to the rejects file with the reason,
and are counted in the summary: nothing is dropped or kept silently.

Two phases, each on the backend its side names (``{ckpt: ...}``: our engine; ``{base_url: ...}``:
an OpenAI-compatible server), many requests in flight in each:

    OUT/recipe.yaml      the recipe (first line: its name and the hash of its dpo section)
    OUT/answers.jsonl    phase 1: the policy's answers per question (the judge phase reads them)
    OUT/pairs.jsonl      phase 2: consistent verdicts
    OUT/rejects.jsonl    phase 2: everything else, with the reason
    OUT/summary.json     counts over the whole folder and this run's figures

With two engine checkpoints the policy engine is closed before the judge's is built (one model in
memory at a time). Crash-safe like `tanuki synth run`: whole lines appended with fsync, a torn last
line cut off, a rerun skips every id already answered (phase 1) or decided (phase 2). A request that
fails (server or engine error) writes nothing: it is counted and a rerun asks again.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import string
import sys
import time
from dataclasses import dataclass, field

from megatron_tanuki.synth.backend import TurnRequest, run_requests
from megatron_tanuki.synth.recipe import Reader, load_section, read_sampling

DPO_KEYS = {"questions", "question_field", "policy", "judge", "answers", "policy_sampling", "judge_max_tokens",
            "judge_prompt", "allow_truncated", "out"}
ENGINE_KEYS = {"ckpt", "chat", "tp", "pp", "ep", "dtype", "fp8", "tokenizer", "kv_memory_gb", "max_seq_len",
               "max_tokens_per_step"}
HTTP_KEYS = {"base_url", "model", "api_key_env", "concurrency", "timeout_s"}
# what decides a side's text (an output folder belongs to one choice); where and how it runs may change
IDENTITY_KEYS = ("name", "ckpt", "chat", "system", "model")

# The MT-Bench pairwise ("pair-v2") judge in our own words: the same structure and verdict format.
JUDGE_SYSTEM = (
    "You are a fair and impartial judge. Below are a user's question and the answers of two AI assistants, "
    "A and B. Decide which assistant answers the question better: which one follows the user's instructions "
    "and gives the more helpful, relevant, accurate and thorough answer. Start by comparing the two answers and "
    "explain your reasoning briefly. Do not let the order in which the answers appear, their length or the "
    "names of the assistants influence you; be as objective as you can. After your explanation, give your "
    "final verdict in exactly this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is "
    "better, \"[[C]]\" if they are equally good.")
JUDGE_USER = (
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]")
JUDGE_FIELDS = ("question", "answer_a", "answer_b")
VERDICT = re.compile(r"\[\[([ABC])\]\]")

# reject reasons, in the order they are checked
IDENTICAL, EMPTY, TRUNCATED = "identical answers", "empty answer", "truncated answer"
UNPARSEABLE, TIE, INCONSISTENT = "unparseable verdict", "tie", "inconsistent"
REASONS = (EMPTY, TRUNCATED, IDENTICAL, UNPARSEABLE, TIE, INCONSISTENT)


# ------------------------------------------------------------------------------ the dpo section

@dataclass
class Side:
    """The policy or the judge: an engine checkpoint (the job_like of ``job.engine_backend``) or servers."""
    role: str                            # "policy" | "judge"
    name: str                            # recorded with every pair
    ckpt: str | None = None
    chat: str | None = None
    system: str | None = None            # policy only: a system message first in every request
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
    model: str | None = None
    api_key_env: str | None = None
    concurrency: int = 32
    timeout_s: float = 600.0

    @property
    def engine(self) -> bool:
        return self.ckpt is not None

    @property
    def nproc(self) -> int:
        return self.tp * self.pp * self.ep


@dataclass
class DpoSpec:
    recipe: object                       # the Recipe
    questions: str                       # an output folder of `tanuki synth run`, or a JSONL file
    question_field: str | None           # JSONL only: the question's field
    policy: Side
    judge: Side
    answers: int
    sampling: dict                       # the policy's temperature, top_p, max_tokens
    judge_max_tokens: int
    judge_system: str
    judge_user: str
    allow_truncated: bool
    out: str
    hash: str                            # of the dpo section: an output folder belongs to one


def load_dpo(path: str) -> DpoSpec:
    """The recipe at ``path`` and its validated ``dpo:`` section; errors name the file and ``dpo.<field>``."""
    recipe = load_section(path, "dpo")
    r = Reader(recipe.path)
    d = r.mapping(recipe.section, "dpo", DPO_KEYS, required=("questions", "policy", "judge"))
    base = os.path.dirname(recipe.path)
    questions = _path(base, r.string(d["questions"], "dpo.questions"))
    if not os.path.exists(questions):
        raise r.error("dpo.questions", f"{questions}: not found (an output folder of `tanuki synth run`, or a "
                      "JSONL file with question_field)")
    qfield = d.get("question_field")
    if os.path.isdir(questions):
        if qfield is not None:
            raise r.error("dpo.question_field", "applies to a JSONL file; a synth output folder gives the first "
                          "user message of every record")
        if not os.path.isdir(os.path.join(questions, "data")):
            raise r.error("dpo.questions", f"{questions}: not an output folder of `tanuki synth run` (no data/)")
    else:
        qfield = r.string(qfield if qfield is not None else "question", "dpo.question_field")
    answers = d.get("answers", 2)
    if answers != 2 or isinstance(answers, bool):
        raise r.error("dpo.answers", f"{answers!r}: only 2 (the judge compares a pair)")
    sampling = read_sampling(r, d.get("policy_sampling") or {}, "dpo.policy_sampling",
                         {"temperature": 0.7, "top_p": 1.0, "max_tokens": 512})
    if sampling["temperature"] <= 0:
        raise r.error("dpo.policy_sampling.temperature", "must be > 0 (at 0 both answers are the same)")
    jmax = d.get("judge_max_tokens", 1024)
    if not isinstance(jmax, int) or isinstance(jmax, bool) or jmax < 1:
        raise r.error("dpo.judge_max_tokens", f"{jmax!r}: a positive integer")
    jp = r.mapping(d.get("judge_prompt") or {}, "dpo.judge_prompt", {"system", "user"})
    system = r.string(jp.get("system", JUDGE_SYSTEM), "dpo.judge_prompt.system")
    user = r.string(jp.get("user", JUDGE_USER), "dpo.judge_prompt.user")
    _check_judge_template(r, user)
    allow = d.get("allow_truncated", False)
    if not isinstance(allow, bool):
        raise r.error("dpo.allow_truncated", "true or false")
    out = _path(base, r.string(d["out"], "dpo.out")) if d.get("out") is not None else \
        os.path.join(os.path.dirname(os.path.abspath(questions)), f"{recipe.name}_dpo")
    policy, judge = _side(r, d["policy"], "policy", base), _side(r, d["judge"], "judge", base)
    identity = {"name": recipe.name, "dpo": {k: v for k, v in d.items() if k not in ("out", "policy", "judge")},
                **{role: {k: d[role].get(k) for k in IDENTITY_KEYS} for role in ("policy", "judge")}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False, default=str).encode()
                            ).hexdigest()[:16]
    return DpoSpec(recipe=recipe, questions=questions, question_field=qfield, policy=policy, judge=judge,
                   answers=answers, sampling=sampling, judge_max_tokens=jmax, judge_system=system, judge_user=user,
                   allow_truncated=allow, out=out, hash=digest)


def _path(base: str, p: str) -> str:
    """Paths in a recipe are relative to the recipe's folder (as seed sources are)."""
    p = os.path.expanduser(p)
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def _side(r: Reader, value, role: str, base: str) -> Side:
    where = f"dpo.{role}"
    known = {"name"} | ENGINE_KEYS | HTTP_KEYS | ({"system"} if role == "policy" else set())
    d = r.mapping(value, where, known)
    if ("ckpt" in d) == ("base_url" in d):
        raise r.error(where, "give either ckpt (our engine) or base_url (an OpenAI-compatible server)")
    for k in d:
        if k in (HTTP_KEYS if "ckpt" in d else ENGINE_KEYS):
            raise r.error(f"{where}.{k}", f"belongs to {'base_url (a server)' if 'ckpt' in d else 'ckpt (the engine)'}")
    s = Side(role=role, name="")
    for k in ("tp", "pp", "ep", "max_seq_len", "max_tokens_per_step", "concurrency"):
        if k in d:
            if not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 1:
                raise r.error(f"{where}.{k}", f"{d[k]!r}: a positive integer")
            setattr(s, k, d[k])
    for k in ("kv_memory_gb", "timeout_s"):
        if k in d:
            if not isinstance(d[k], (int, float)) or isinstance(d[k], bool) or d[k] <= 0:
                raise r.error(f"{where}.{k}", f"{d[k]!r}: a number > 0")
            setattr(s, k, float(d[k]))
    for k in ("chat", "dtype", "fp8", "tokenizer", "model", "api_key_env"):
        if k in d:
            setattr(s, k, r.string(d[k], f"{where}.{k}"))
    if "system" in d:
        s.system = r.string(d["system"], f"{where}.system", empty_ok=True)
    if "ckpt" in d:
        s.ckpt = _path(base, r.string(d["ckpt"], f"{where}.ckpt"))
        if s.chat is not None:
            from megatron_tanuki.data import templates

            try:
                templates.get(s.chat)
            except ValueError as e:
                raise r.error(f"{where}.chat", str(e)) from None
    else:
        urls = d["base_url"] if isinstance(d["base_url"], list) else [d["base_url"]]
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise r.error(f"{where}.base_url", f"{d['base_url']!r}: a URL (http://host:port/v1) or a list of them")
        s.base_urls = urls
    s.name = r.string(d["name"], f"{where}.name") if "name" in d else \
        s.model or (os.path.basename(os.path.normpath(s.ckpt)) if s.ckpt else s.base_urls[0])
    return s


def _check_judge_template(r: Reader, text: str) -> None:
    where = "dpo.judge_prompt.user"
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise r.error(where, f"not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    for f in sorted(names - set(JUDGE_FIELDS)):
        raise r.error(where, f"{{{f}}} is not defined (defined here: {', '.join(JUDGE_FIELDS)})")
    for f in JUDGE_FIELDS:
        if f not in names:
            raise r.error(where, f"must contain {{{f}}}")


def _check_sides(spec: DpoSpec) -> dict:
    """Before any model loads: the engine sides' checkpoints and templates, API key variables.
    Returns {role: True} for an engine judge whose template has no system turn (the judge's system
    prompt then goes first in the user message)."""
    r = Reader(spec.recipe.path)
    fold = {}
    for side in (spec.policy, spec.judge):
        where = f"dpo.{side.role}"
        if side.api_key_env and not os.environ.get(side.api_key_env):
            raise r.error(f"{where}.api_key_env", f"{side.api_key_env}: the variable is not set")
        if not side.engine:
            continue
        from megatron_tanuki.data import templates
        from megatron_tanuki.models import registry
        from megatron_tanuki.models.checkpoint_meta import MetaError, read_meta, resolve

        try:
            cfg = read_meta(resolve(side.ckpt)).config
        except (FileNotFoundError, MetaError) as e:
            raise r.error(f"{where}.ckpt", str(e)) from None
        template = templates.get(side.chat or registry.architecture_of(cfg).default_chat)
        if side.role == "policy" and side.system is not None and not template.system_turn:
            raise r.error(f"{where}.system", f"the {template.name} template has no system turn")
        fold[side.role] = side.role == "judge" and not template.system_turn
    return fold


# ------------------------------------------------------------------------------ questions, seeds, verdicts

def answer_seed(qid: str, k: int) -> int:
    """The sampling seed of answer ``k`` to question ``qid``: distinct per answer, the same on a rerun."""
    return int(hashlib.sha256(f"{qid}:{k}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def judge_seed(qid: str, order: int) -> int:
    return int(hashlib.sha256(f"{qid}:judge:{order}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def iter_questions(spec: DpoSpec, limit: int | None = None, counts: dict | None = None):
    """(id, question) in source order: the first user message of every record of a synth output folder
    (its id), or ``question_field`` of every line of a JSONL file (its ``id``, else a hash of the text).
    A repeated id is skipped (counted in ``counts["duplicate_questions"]``); at most ``limit``."""
    from megatron_tanuki.synth.store import iter_records

    where = f"{spec.recipe.path}: dpo.questions"
    if os.path.isdir(spec.questions):
        folder = os.path.join(spec.questions, "data")
        files = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".jsonl")]
    else:
        files = [spec.questions]
    seen, n = set(), 0
    for path in files:
        for line, rec in iter_records(path):
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: {path}:{line}: not a JSON object")
            if spec.question_field is None:
                text = next((m.get("content") for m in rec.get("messages") or []
                             if isinstance(m, dict) and m.get("role") == "user"), None)
                qid = rec.get("id")
                what = "a synth record (\"id\" and a user message)"
            else:
                text = rec.get(spec.question_field)
                qid = rec.get("id", hashlib.sha256(str(text).encode()).hexdigest()[:16])
                what = f"a line with a string field {spec.question_field!r}"
            if not isinstance(text, str) or not text.strip() or qid is None or isinstance(qid, (dict, list)):
                raise ValueError(f"{where}: {path}:{line}: not {what}")
            qid = str(qid)
            if qid in seen:
                if counts is not None:
                    counts["duplicate_questions"] = counts.get("duplicate_questions", 0) + 1
                continue
            seen.add(qid)
            yield qid, text.strip()
            n += 1
            if limit is not None and n >= limit:
                return


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "C" when the judgment names exactly one of [[A]], [[B]], [[C]] (repeating it is
    fine); None when it names none or several."""
    found = set(VERDICT.findall(text or ""))
    return found.pop() if len(found) == 1 else None


def decide(verdicts: list) -> tuple[int | None, str | None]:
    """(index of the winning answer, None) for a consistent pair of verdicts -- order 1 showed the
    answers as (A=0, B=1), order 2 swapped (A=1, B=0) -- else (None, reject reason). Both "C": a tie;
    different winners, or a winner once and a tie once: inconsistent."""
    if None in verdicts:
        return None, UNPARSEABLE
    if verdicts == ["C", "C"]:
        return None, TIE
    first = {"A": 0, "B": 1}.get(verdicts[0])
    second = {"A": 1, "B": 0}.get(verdicts[1])
    if first is not None and first == second:
        return first, None
    return None, INCONSISTENT


# ------------------------------------------------------------------------------ running

@dataclass
class PhaseTask:
    """What one rank of a phase needs (picklable: spawned ranks get it)."""
    recipe: str
    out: str
    role: str                          # "policy" | "judge"
    limit: int | None = None
    progress: bool | None = None
    fold_system: bool = False          # judge: the template has no system turn
    nproc: int | None = None           # set by the local launcher


def run_dpo(recipe_path: str, out: str | None = None, *, limit: int | None = None, progress=None) -> dict:
    """Answer (policy), judge both orders (judge), write pairs / rejects / summary under ``out``
    (default: the recipe's dpo.out, else ``<recipe name>_dpo`` beside the questions). Returns the
    summary (on rank 0; other ranks of a launch get ``{}``)."""
    from megatron_tanuki.runtime.spawn import launcher_rank

    spec = load_dpo(recipe_path)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be at least 1")
    out = os.path.abspath(out or spec.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a folder")
    fold = _check_sides(spec)
    under_launcher = launcher_rank() is not None
    if under_launcher and not spec.policy.engine and spec.judge.engine:
        raise ValueError(f"{spec.recipe.path}: dpo.policy: under a launcher (torchrun/srun) the policy must be an "
                         "engine checkpoint when the judge is one (the judge's ranks cannot wait out a server "
                         "phase); start `tanuki synth dpo` without the launcher, it starts the judge's ranks")
    rank0 = launcher_rank() in (None, "0")
    if rank0:
        _claim(out, spec)
    t0 = time.monotonic()
    engines = spec.policy.engine or spec.judge.engine
    was_initialized = _dist_initialized() if engines else True
    try:
        phases = {}
        for role in ("policy", "judge"):
            task = PhaseTask(recipe=spec.recipe.path, out=out, role=role, limit=limit, progress=progress,
                             fold_system=fold.get(role, False))
            side = getattr(spec, role)
            has_work = _has_work(spec, out, role, limit)
            if under_launcher and side.engine and _dist_initialized():
                has_work = _broadcast(has_work)  # rank 0 may still be appending the last answer
            if not has_work:
                phases[role] = {"questions": 0, "skipped": 0, "finished": 0, "note": "nothing to do (not started)"}
            elif side.engine:
                from megatron_tanuki.runtime.spawn import run_job

                phases[role] = run_job(phase_rank, task, side.nproc)[0]
            else:
                phases[role] = phase_rank(task) if rank0 else {}
    finally:
        if not was_initialized and not under_launcher:
            from megatron_tanuki.runtime.distributed import shutdown

            shutdown()
    if not rank0:
        return {}
    summary = _summary(spec, out, limit, phases, time.monotonic() - t0)
    _write_json(os.path.join(out, "summary.json"), summary)
    return summary


def _has_work(spec: DpoSpec, out: str, role: str, limit) -> bool:
    """Whether the phase would ask anything (a rerun of a finished folder loads no model)."""
    from megatron_tanuki.synth.store import read_ids

    def ids(name: str) -> set:
        path = os.path.join(out, name)
        return read_ids(path) if os.path.exists(path) else set()

    wanted = {qid for qid, _ in iter_questions(spec, limit)}
    answered = ids("answers.jsonl")
    if role == "policy":
        return bool(wanted - answered)
    return bool((wanted & answered) - ids("pairs.jsonl") - ids("rejects.jsonl"))


def _dist_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_initialized()


def phase_rank(task: PhaseTask) -> dict:
    """One rank of one phase: build the side's backend, run the phase, close the backend (the model
    leaves memory before the next phase builds its own)."""
    spec = load_dpo(task.recipe)
    side = getattr(spec, task.role)
    if side.engine:
        import torch.distributed as dist

        from megatron_tanuki.synth.job import engine_backend

        backend = engine_backend(side, side.chat, where=f"{spec.recipe.path}: dpo.{side.role}")
        rank0, share = dist.get_rank() == 0, _broadcast
    else:
        from megatron_tanuki.synth.http_backend import OpenAIBackend

        key = os.environ.get(side.api_key_env) if side.api_key_env else None
        backend = OpenAIBackend(side.base_urls, model=side.model, api_key=key, timeout_s=side.timeout_s,
                                concurrency=side.concurrency)
        rank0, share = True, None
    try:
        phase = answer_phase if task.role == "policy" else judge_phase
        return phase(spec, task, backend, rank0, share)
    finally:
        backend.close()
        del backend
        if side.engine:
            _free_memory()


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _broadcast(value):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _done_ids(paths: list[str], rank0: bool, share) -> set:
    """Ids in ``paths`` (rank 0 cuts off a torn last line), the same set on every rank."""
    from megatron_tanuki.synth.store import read_ids

    done = set()
    if rank0:
        for p in paths:
            if os.path.exists(p):
                done |= read_ids(p, repair=True)
    return share(done) if share is not None else done


class _Phase:
    """Counters, the progress line and the writers of one phase on one rank."""

    def __init__(self, name: str, task: PhaseTask, backend, rank0: bool, total: int, skipped: int):
        from megatron_tanuki.runtime.progress import progress_disabled

        self.name, self.backend, self.rank0 = name, backend, rank0
        self.total, self.skipped = total, skipped
        self.t0 = self.last = time.monotonic()
        self.finished = 0
        self.counts: dict = {}
        self.errors: dict = {}
        self.tokens = {"prompt": 0, "completion": 0}
        self.first_error: str | None = None
        self.show = rank0 and not progress_disabled(task.progress)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def result(self, res) -> None:
        self.tokens["prompt"] += res.prompt_tokens
        self.tokens["completion"] += res.completion_tokens
        if res.finish_reason == "error":
            kind = res.error_kind or "error"
            self.errors[kind] = self.errors.get(kind, 0) + 1
            self.first_error = self.first_error or res.error

    def tick(self) -> None:
        if not self.show or time.monotonic() - self.last < 10:
            return
        self.last = time.monotonic()
        el = self.last - self.t0
        rate = self.finished / el
        left = self.total - self.skipped - self.finished
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        print(f"[dpo] {self.name}: {self.skipped + self.finished}/{self.total} questions | "
              f"{self.backend.in_flight()} requests in flight | {self.tokens['completion'] / el:.0f} tok/s | "
              f"errors {sum(self.errors.values())} | ETA {eta}", file=sys.stderr, flush=True)

    def report(self) -> dict:
        el = time.monotonic() - self.t0
        out = {"questions": self.total, "skipped": self.skipped, "finished": self.finished, **self.counts,
               "errors": dict(self.errors), "seconds": round(el, 3),
               **{f"{k}_tokens": v for k, v in self.tokens.items()},
               "tokens_per_s": round(self.tokens["completion"] / max(el, 1e-9), 2)}
        if self.errors and self.rank0:
            print(f"[dpo] {self.name}: {sum(self.errors.values())} requests failed ({self.first_error}); "
                  "nothing was written for them: a rerun asks again", file=sys.stderr, flush=True)
        return out


def answer_phase(spec: DpoSpec, task: PhaseTask, backend, rank0: bool, share) -> dict:
    """Phase 1: every question not yet answered gets ``spec.answers`` answers (distinct seeds), all
    submitted continuously; a question's record is written when its last answer arrives."""
    from megatron_tanuki.inference.generate import Writer

    path = os.path.join(task.out, "answers.jsonl")
    done = _done_ids([path], rank0, share)
    questions = list(iter_questions(spec, task.limit))
    skipped = sum(1 for qid, _ in questions if qid in done)
    ph = _Phase("policy answers", task, backend, rank0, len(questions), skipped)
    writer = Writer(path) if rank0 else None
    pending: dict[str, dict] = {}
    system = [{"role": "system", "content": spec.policy.system}] if spec.policy.system is not None else []
    s = spec.sampling

    def requests():
        for qid, text in questions:
            if qid in done:
                continue
            pending[qid] = {"prompt": text, "results": [None] * spec.answers}
            for k in range(spec.answers):
                yield TurnRequest(key=f"{qid}:answer:{k}", messages=system + [{"role": "user", "content": text}],
                                  temperature=float(s["temperature"]), top_p=float(s["top_p"]),
                                  max_tokens=int(s["max_tokens"]), seed=answer_seed(qid, k))

    if rank0:
        print(f"[dpo] policy answers ({spec.policy.name}): {len(questions) - skipped} questions to answer, "
              f"{skipped} answered before", flush=True)
    try:
        for res in run_requests(backend, requests()):
            qid, _, k = res.key.rsplit(":", 2)
            entry = pending[qid]
            entry["results"][int(k)] = res
            ph.result(res)
            if any(r is None for r in entry["results"]):
                continue
            del pending[qid]
            ph.finished += 1
            results = entry["results"]
            if any(r.finish_reason == "error" for r in results):
                ph.add("failed")
                continue
            ph.add("answered")
            if writer is not None:
                writer.write({"id": qid, "prompt": entry["prompt"], "answers": [r.text.strip() for r in results],
                              "finish_reasons": [r.finish_reason for r in results],
                              "seeds": [answer_seed(qid, k) for k in range(spec.answers)],
                              "policy": spec.policy.name, "sampling": dict(s)})
            ph.tick()
    finally:
        if writer is not None:
            writer.close()
    return ph.report()


def judge_phase(spec: DpoSpec, task: PhaseTask, backend, rank0: bool, share) -> dict:
    """Phase 2: every answered question not yet decided is judged twice, the answers in both orders
    (the two requests submitted together, temperature 0); the pair or the reject is written when both
    verdicts are in. Empty, truncated and identical answers are rejected without asking the judge."""
    from megatron_tanuki.inference.generate import Writer
    from megatron_tanuki.synth.store import iter_records

    pairs_path = os.path.join(task.out, "pairs.jsonl")
    rejects_path = os.path.join(task.out, "rejects.jsonl")
    answers_path = os.path.join(task.out, "answers.jsonl")
    done = _done_ids([pairs_path, rejects_path], rank0, share)
    wanted = {qid for qid, _ in iter_questions(spec, task.limit)}
    skipped = len(wanted & done)
    ph = _Phase("judge verdicts", task, backend, rank0, len(wanted), skipped)
    pairs = Writer(pairs_path) if rank0 else None
    rejects = Writer(rejects_path) if rank0 else None
    pending: dict[str, dict] = {}
    seen: set[str] = set()

    def reject(rec: dict, reason: str, judged: dict | None = None) -> None:
        ph.add(reason)
        if rejects is not None:
            rejects.write({"id": rec["id"], "reason": reason, "prompt": rec["prompt"], "answers": rec["answers"],
                           "finish_reasons": rec["finish_reasons"], "policy": rec.get("policy"),
                           **({"judge": judged} if judged else {})})

    def judge_request(rec: dict, order: int) -> TurnRequest:
        a, b = rec["answers"] if order == 0 else rec["answers"][::-1]
        user = spec.judge_user.format(question=rec["prompt"], answer_a=a, answer_b=b)
        messages = [{"role": "user", "content": f"{spec.judge_system}\n\n{user}"}] if task.fold_system else \
            [{"role": "system", "content": spec.judge_system}, {"role": "user", "content": user}]
        return TurnRequest(key=f"{rec['id']}:judge:{order}", messages=messages, temperature=0.0, top_p=1.0,
                           max_tokens=spec.judge_max_tokens, seed=judge_seed(rec["id"], order))

    def requests():
        if not os.path.exists(answers_path):
            return
        for _, rec in iter_records(answers_path):
            qid = rec["id"]
            if qid not in wanted or qid in done or qid in seen:
                continue
            seen.add(qid)
            answers = rec["answers"]
            if any(not a for a in answers):
                reject(rec, EMPTY)
            elif not spec.allow_truncated and "length" in rec["finish_reasons"]:
                reject(rec, TRUNCATED)
            elif len(set(answers)) < len(answers):
                reject(rec, IDENTICAL)
            else:
                pending[qid] = {"rec": rec, "results": [None, None]}
                yield judge_request(rec, 0)
                yield judge_request(rec, 1)
                continue
            ph.finished += 1

    if rank0:
        print(f"[dpo] judge verdicts ({spec.judge.name}): {len(wanted) - skipped} questions to decide, "
              f"{skipped} decided before", flush=True)
    try:
        for res in run_requests(backend, requests()):
            qid, _, order = res.key.rsplit(":", 2)
            entry = pending[qid]
            entry["results"][int(order)] = res
            ph.result(res)
            if None in entry["results"]:
                continue
            del pending[qid]
            ph.finished += 1
            results, rec = entry["results"], entry["rec"]
            if any(r.finish_reason == "error" for r in results):
                ph.add("failed")
                continue
            verdicts = [parse_verdict(r.text) for r in results]
            judged = {"model": spec.judge.name, "verdicts": verdicts, "judgments": [r.text for r in results]}
            winner, reason = decide(verdicts)
            if reason is not None:
                reject(rec, reason, judged)
            else:
                ph.add("pairs")
                if pairs is not None:
                    pairs.write({"id": qid, "prompt": rec["prompt"], "chosen": rec["answers"][winner],
                                 "rejected": rec["answers"][1 - winner], "judge": judged,
                                 "policy": {"model": rec.get("policy"), "seeds": rec.get("seeds")}})
            ph.tick()
    finally:
        for w in (pairs, rejects):
            if w is not None:
                w.close()
    ph.add("unanswered", len(wanted - done - seen))
    return ph.report()


# ------------------------------------------------------------------------------ the folder

def _claim(out: str, spec: DpoSpec) -> None:
    """OUT/recipe.yaml: an output folder holds the pairs of one dpo section; another is refused."""
    path = os.path.join(out, "recipe.yaml")
    head = f"# dpo recipe {spec.recipe.name} hash {spec.hash}\n"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            first = f.readline()
        if first != head:
            raise ValueError(f"{out}: holds the output of another recipe or dpo section "
                             f"({first.strip()[2:] or 'unknown'}); this is {spec.recipe.name} dpo hash {spec.hash} "
                             "-- use another --out")
        return
    os.makedirs(out, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(head + spec.recipe.text)
    os.replace(tmp, path)


def _write_json(path: str, value: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def _summary(spec: DpoSpec, out: str, limit, phases: dict, seconds: float) -> dict:
    """Counts over the whole folder (every run so far) and this run's phases."""
    from megatron_tanuki.synth.store import iter_records

    counts: dict = {}
    questions = [qid for qid, _ in iter_questions(spec, limit, counts)]
    pairs = rejects = 0
    reasons = dict.fromkeys(REASONS, 0)
    decided = set()
    for name in ("pairs", "rejects"):
        path = os.path.join(out, f"{name}.jsonl")
        if not os.path.exists(path):
            continue
        for _, rec in iter_records(path):
            decided.add(rec["id"])
            if name == "pairs":
                pairs += 1
            else:
                rejects += 1
                reasons[rec["reason"]] = reasons.get(rec["reason"], 0) + 1
    return {"recipe": spec.recipe.name, "dpo_hash": spec.hash, "questions": len(questions),
            "duplicate_questions": counts.get("duplicate_questions", 0), "pairs": pairs, "rejected": rejects,
            "rejects": reasons, "undecided": sum(1 for q in questions if q not in decided),
            "policy": spec.policy.name, "judge": spec.judge.name, "seconds": round(seconds, 3),
            "this_run": phases}
