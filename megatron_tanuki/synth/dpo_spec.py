"""The ``dpo:`` section of a recipe, read and checked before any model loads, and the rules that
make a DPO pair reproducible and its verdict strict.

Why a module of its own: everything here is decided from the recipe alone -- which questions, which
policy and judge (an engine checkpoint or servers), the judge's prompt, the seed of every answer and
verdict, and how two verdicts become a pair or a reject reason -- so a mistake is reported naming the
file and ``dpo.<field>`` before a rank starts, and the phases (dpo_phases.py) only ask and write.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import string
from dataclasses import dataclass, field

from megatron_tanuki.synth.recipe import Reader, load_section, read_sampling

DPO_KEYS = {"questions", "question_field", "policy", "judge", "answers", "policy_sampling", "judge_max_tokens",
            "judge_prompt", "allow_truncated", "out"}
ENGINE_KEYS = {"ckpt", "chat", "tp", "pp", "ep", "dtype", "fp8", "tokenizer", "kv_memory_gb", "max_seq_len",
               "max_tokens_per_step"}
HTTP_KEYS = {"base_url", "model", "api_key_env", "concurrency", "timeout_s", "max_retries"}
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
REQUEST = "request error"            # the policy or judge refused the request itself (the record says why)
REASONS = (REQUEST, EMPTY, TRUNCATED, IDENTICAL, UNPARSEABLE, TIE, INCONSISTENT)

# Error kinds that say the request itself cannot be served, so asking again gives the same answer: our
# engine's "request" (e.g. a prompt longer than the context), an HTTP client error about the body (400 bad
# request -- vLLM's and OpenAI's answer to a prompt over the context --, 413 too large, 422 unprocessable),
# and an HTTP client error of the backend itself ("request"). Such a question is rejected for good. Every
# other kind -- 5xx, 429, timeouts, connection, an engine failure, and 401/403/404 (a configuration to fix,
# not the question's fault) -- leaves the question undecided: a rerun asks again.
PERMANENT_ERRORS = frozenset({"request", "http_400", "http_413", "http_422"})


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
    max_retries: int = 8                 # a server's transient errors (5xx, 429, connection) tried again

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
    question_field: str | None           # a JSONL file of plain lines: the question's field; None: synth records
    question_files: list                 # what is read: filtered/data.jsonl, data/*.jsonl or the file
    filtered: bool                       # question_files is `tanuki synth filter`'s: only its keep: true rows
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
                      "JSONL file: synth records, or lines with question_field)")
    qfield = d.get("question_field")
    if os.path.isdir(questions):
        if qfield is not None:
            raise r.error("dpo.question_field", "applies to a JSONL file; a synth output folder gives the first "
                          "user message of every record")
        files, filtered = _synth_folder(r, questions)
    else:
        files, filtered = [questions], False
        if qfield is not None or not _synth_shaped(questions):
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
    return DpoSpec(recipe=recipe, questions=questions, question_field=qfield, question_files=files,
                   filtered=filtered, policy=policy, judge=judge,
                   answers=answers, sampling=sampling, judge_max_tokens=jmax, judge_system=system, judge_user=user,
                   allow_truncated=allow, out=out, hash=digest)


def _synth_folder(r: Reader, folder: str) -> tuple[list[str], bool]:
    """The files holding a `tanuki synth run` folder's questions, as `tanuki synth export` reads them:
    OUT/filtered/data.jsonl when the folder has been filtered (a filter that no longer covers data/ is
    refused), else OUT/data/*.jsonl."""
    from megatron_tanuki.synth.export import ExportError, check_fresh, filter_summary, row_sources

    if not os.path.isdir(os.path.join(folder, "data")):
        raise r.error("dpo.questions", f"{folder}: not an output folder of `tanuki synth run` (no data/)")
    try:
        files, filtered = row_sources(folder)
        if filtered:
            check_fresh(folder, filter_summary(folder))
    except ExportError as e:
        raise r.error("dpo.questions", f"{e} (a filtered folder's questions are the rows `tanuki synth filter` "
                      "kept)") from None
    return files, filtered


def _synth_shaped(path: str) -> bool:
    """Whether a JSONL file holds synth records (its first record has "messages")."""
    from megatron_tanuki.synth.store import iter_records

    first = next(iter_records(path), (0, None))[1]
    return isinstance(first, dict) and "messages" in first


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
    for k in ("tp", "pp", "ep", "max_seq_len", "max_tokens_per_step", "concurrency", "max_retries"):
        if k in d:
            if not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < (0 if k == "max_retries" else 1):
                raise r.error(f"{where}.{k}", f"{d[k]!r}: a {'non-negative' if k == 'max_retries' else 'positive'} "
                              "integer")
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


def check_sides(spec: DpoSpec) -> dict:
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
    """(id, question) in source order: the first user message of every synth record -- a `tanuki synth
    run` output folder (only the rows `tanuki synth filter` kept, when it has been filtered) or a JSONL
    file of such records -- with its ``id`` (in a file: else a hash of the text), or ``question_field`` of
    every line of a plain JSONL file (its ``id``, else a hash of the text). A repeated id is skipped
    (counted in ``counts["duplicate_questions"]``); at most ``limit``."""
    from megatron_tanuki.synth.export import ExportError, iter_rows

    where = f"{spec.recipe.path}: dpo.questions"
    in_folder = os.path.isdir(spec.questions)
    seen, n = set(), 0
    try:
        for path, line, rec, keep in iter_rows(spec.question_files, spec.filtered):
            if not keep:
                continue
            if spec.question_field is None:
                text = next((m.get("content") for m in rec.get("messages") or []
                             if isinstance(m, dict) and m.get("role") == "user"), None)
                what = "a synth record (\"id\" and a user message)" if in_folder else "a record with a user message"
            else:
                text = rec.get(spec.question_field)
                what = f"a line with a string field {spec.question_field!r}"
            qid = rec.get("id") if in_folder else rec.get("id", hashlib.sha256(str(text).encode()).hexdigest()[:16])
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
    except ExportError as e:  # a line that is not an object, a bad keep flag
        raise ValueError(f"{where}: {e}") from None


def unjudgeable(rec: dict, allow_truncated: bool) -> str | None:
    """The reason a record of answers.jsonl is rejected without asking the judge, or None."""
    answers = rec["answers"]
    if any(not a for a in answers):
        return EMPTY
    if not allow_truncated and "length" in rec["finish_reasons"]:
        return TRUNCATED
    if len(set(answers)) < len(answers):
        return IDENTICAL
    return None


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
