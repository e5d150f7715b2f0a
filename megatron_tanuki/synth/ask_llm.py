"""Ask-LLM scoring of synthetic conversations: "can this be solved with the information given?"

Ask-LLM (Sachdeva et al. 2024, "How to Train Data-Efficient LLMs") asks a scorer model a yes/no
question about a sample and keeps the samples whose P(yes) is high; the seed team scored their
synthetic sets this way (nano_askllm, prompt "###\\n{text}\\n###\\n\\nIs it possible to solve this
problem with the information provided?"). Here the question is in Japanese, about a conversation,
and asked **cumulatively**: one prompt per prefix (Q1; Q1+A1; Q1+A1+Q2; Q1+A1+Q2+A2), so a follow-up
question that cannot be answered is caught even when the first one is fine.

- p(prompt) = the sum of P(w) over the ``yes`` words at the end of the prompt (the scorer's next-token
  distribution); with ``no`` words given, p = P(yes) / (P(yes) + P(no)) instead (0 when both are 0).
  Each word must be one token of the scorer's tokenizer, else the check is meaningless (ValueError
  naming the word and its ids). How a word becomes a probability differs by scorer: the checkpoint
  scorer reads P of the word's single encoded id; the URL scorer sums P of every top-20 token whose
  text, spaces trimmed, equals the word (so "yes" and " yes" both count there, only one of them in the
  checkpoint scorer). It does not match by id even when ``tokenizer`` is given: /v1/completions
  answers with token texts only, and the id form (vLLM's ``return_tokens_as_token_ids``) is not
  OpenAI's API: a server that refuses the field would answer every request 400, which drops every row.
- The row's score is the **minimum** over its prompts by default (``reduce: min``): the question is
  whether *every* step is answerable, and a full conversation's last prompt can look fine because
  A2 fills in what an ill-posed Q2 left out; ``last`` and ``mean`` are there for comparison.
- Kept by ``threshold`` (score >= 0.5 by default) or by rank (``keep_top: 0.8`` keeps the best 80% of
  the scored rows; ties go to the earlier row).
- The row's record: ``{"p_yes": [one per prompt], "score"}``, + ``"p_no"`` when ``no`` words are
  given, + ``"rank"`` (1 = best) under ``keep_top``, + ``"error"`` when a prompt could not be scored
  (longer than the scorer's context, a 4xx answer): such a row is dropped "ask_llm_error turn k: ...".

Scorers: a checkpoint folder -> one batched, resumable pass of ``tanuki generate --score`` (the
in-process engine, all ranks of TP/PP/EP); a URL -> an OpenAI-compatible ``/v1/completions`` with
``max_tokens=1, logprobs=20, temperature=0``, summing exp(logprob) of the top tokens whose text (spaces
stripped: servers print SentencePiece's "▁yes" as " yes") is a yes word; a yes word outside the top 20
counts 0. The prompt is rendered with the chat template (``chat``; the checkpoint's own by default,
``tanuki`` for a URL; ``none`` sends the bare text) so both scorers see the same text.

Work files (``OUT/filtered/ask_llm/``): ``requests.jsonl`` ({"id": "<row id>:<k>", "prompt"}),
``scores.jsonl`` (generate's output shape: {"id", "scores": {word: P}} or an error record) and
``stamp.json`` (scorer, prompt settings, yes/no words, tokenizer and the requests' SHA-256). A killed run resumes: the scores
are kept while the stamp matches, and both scorers skip the ids already answered; a rerun with another
threshold scores nothing again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import string
import sys
import threading
import time
from dataclasses import dataclass

DEFAULT_PROMPT = ("###\n{conversation}\n###\n\n"
                  "上の###で囲まれた会話の内容は、与えられた情報だけで解くことができますか？ "
                  "yes か no で答えてください。")
ROLE_LABELS = {"user": "ユーザー", "assistant": "アシスタント"}
REDUCERS = {"min": min, "last": lambda v: v[-1], "mean": lambda v: sum(v) / len(v)}
TOP_LOGPROBS = 20
FATAL_STATUS = (401, 403, 404, 405)       # the URL, key or model is wrong: no request can succeed


@dataclass(frozen=True)
class AskLLMConfig:
    """``filters.ask_llm`` of a recipe."""
    prompt: str = DEFAULT_PROMPT
    yes: tuple[str, ...] = ("yes", "Yes")
    no: tuple[str, ...] = ()
    chat: str | None = None               # None: the checkpoint's template; tanuki for a URL
    reduce: str = "min"                   # min | last | mean over the cumulative prompts
    threshold: float | None = None        # None: 0.5 unless keep_top is given
    keep_top: float | None = None         # keep this fraction of the scored rows, best first
    tokenizer: str | None = None          # checks the yes/no words (default: the checkpoint's)
    kv_memory_gb: float | None = None     # checkpoint scorer: KV cache per rank (None: the engine's default)
    model: str | None = None              # URL: the model name to send (None: the server's first)
    api_key_env: str = "TANUKI_API_KEY"   # URL: the environment variable holding the key, if set
    concurrency: int = 16                 # URL: requests in flight
    timeout_s: float = 120.0              # URL: per request
    retries: int = 5                      # URL: on 429, 5xx and connection errors, with backoff

    def effective_threshold(self) -> float | None:
        return None if self.keep_top is not None else (0.5 if self.threshold is None else self.threshold)


# ----------------------------------------------------------------------------- prompts

def prompt_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def conversation_text(messages: list[dict]) -> str:
    return "\n\n".join(f"{ROLE_LABELS[m['role']]}: {m['content']}" for m in messages)


def prompts(messages: list[dict], template: str = DEFAULT_PROMPT) -> list[str]:
    """One prompt per prefix of the conversation (system messages left out)."""
    turns = [m for m in messages if m.get("role") in ROLE_LABELS]
    return [template.format(conversation=conversation_text(turns[:k])) for k in range(1, len(turns) + 1)]


def is_url(scorer: str) -> bool:
    return scorer.startswith(("http://", "https://"))


def check_words(scorer: str, config: AskLLMConfig, where: str) -> None:
    """Each yes/no word must be one token of the scorer's tokenizer (a URL's is checked only when
    ``tokenizer`` is given)."""
    words = list(config.yes) + list(config.no)
    if not config.yes:
        raise ValueError(f"{where}: filters.ask_llm.yes: give at least one word")
    if len(set(words)) != len(words):
        raise ValueError(f"{where}: filters.ask_llm: a word is given twice in yes/no {words}")
    if is_url(scorer) and config.tokenizer is None:
        return
    from megatron_tanuki.data.tokenizer import load_tokenizer

    if not is_url(scorer) and not os.path.exists(scorer):
        raise FileNotFoundError(2, "Ask-LLM scorer checkpoint not found", scorer)
    name = config.tokenizer
    if name is None:
        from megatron_tanuki.inference.generate import checkpoint_tokenizer

        name = checkpoint_tokenizer(scorer)
    tok = load_tokenizer(name)
    for field, group in (("yes", config.yes), ("no", config.no)):
        for w in group:
            ids = tok.encode(w)
            if len(ids) != 1:
                raise ValueError(
                    f"{where}: filters.ask_llm.{field}: {w!r} encodes to {len(ids)} tokens {ids} of the scorer's "
                    f"tokenizer ({name or 'the Tanuki tokenizer'}); each word must be one token (try it with or "
                    "without a leading space, or another spelling)")


# ----------------------------------------------------------------------------- work files

class ScoreWork:
    """The scorer's request and score files under ``folder`` (see the module docstring)."""

    def __init__(self, folder: str, scorer: str, config: AskLLMConfig):
        self.folder, self.scorer, self.config = folder, scorer, config
        self.requests = os.path.join(folder, "requests.jsonl")
        self.scores = os.path.join(folder, "scores.jsonl")
        self.stamp_path = os.path.join(folder, "stamp.json")
        self.count = 0
        os.makedirs(folder, exist_ok=True)
        self._f = open(self.requests + ".tmp", "w", encoding="utf-8")
        self._sha = hashlib.sha256()

    def add(self, row_id: str, messages: list[dict]) -> int:
        """Writes the row's prompts; returns how many."""
        texts = prompts(messages, self.config.prompt)
        for k, text in enumerate(texts):
            line = json.dumps({"id": f"{row_id}:{k}", "prompt": text}, ensure_ascii=False) + "\n"
            self._f.write(line)
            self._sha.update(line.encode())
        self.count += len(texts)
        return len(texts)

    def stamp(self) -> dict:
        scorer = self.scorer if is_url(self.scorer) else os.path.abspath(self.scorer)
        c = self.config
        return {"scorer": scorer, "prompt": c.prompt, "chat": c.chat, "yes": list(c.yes), "no": list(c.no),
                "tokenizer": c.tokenizer, "requests_sha256": self._sha.hexdigest()}

    def finish_requests(self) -> None:
        """Closes the request file; scores of another scorer, prompt or request set are discarded."""
        self._f.close()
        os.replace(self.requests + ".tmp", self.requests)
        stamp = self.stamp()
        try:
            with open(self.stamp_path, encoding="utf-8") as f:
                same = json.load(f) == stamp
        except (OSError, ValueError):
            same = False
        if not same:
            if os.path.exists(self.scores):
                os.remove(self.scores)
            tmp = self.stamp_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(stamp, f, ensure_ascii=False, indent=1)
            os.replace(tmp, self.stamp_path)

    def pending(self) -> int:
        """Requests without an answer in the score file."""
        from megatron_tanuki.inference.generate import is_done, parse_requests, read_done

        done = read_done(self.scores)
        return sum(1 for p in parse_requests(self.requests) if not is_done(p, done))

    def run(self, *, tp: int = 1, pp: int = 1, ep: int = 1, nproc: int | None = None,
            progress: bool | None = None) -> None:
        if not self.count or not self.pending():
            return
        if is_url(self.scorer):
            score_url(self.scorer, self.requests, self.scores, self.config, progress)
            return
        from megatron_tanuki.inference import generate

        generate.run(generate.GenerateJob(
            ckpt=self.scorer, input=self.requests, output=self.scores, tp=tp, pp=pp, ep=ep, nproc=nproc,
            max_tokens=1, temperature=0.0, chat=self.config.chat, score=tuple(self.config.yes) + tuple(self.config.no),
            tokenizer=self.config.tokenizer, kv_memory_gb=self.config.kv_memory_gb, progress=progress))

    def read(self) -> dict[str, dict[int, object]]:
        """row id -> {k: {word: P} or an error text}."""
        out: dict[str, dict[int, object]] = {}
        with open(self.scores, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                row_id, _, k = str(rec.get("id")).rpartition(":")
                if not k.isdigit():
                    continue  # an error record for a line without an id: never ours (we write every id)
                out.setdefault(row_id, {})[int(k)] = rec["scores"] if "scores" in rec else rec.get("error", "no score")
        return out

    def cleanup(self) -> None:
        """The request file is as large as the data (x turns) and goes; the scores and stamp stay for
        reruns (an empty folder goes too)."""
        if not self._f.closed:
            self._f.close()
        for path in (self.requests, self.requests + ".tmp"):
            if os.path.exists(path):
                os.remove(path)
        if not os.listdir(self.folder):
            os.rmdir(self.folder)


# ----------------------------------------------------------------------------- scores -> decisions

def row_result(answers: dict[int, object] | None, n: int, config: AskLLMConfig) -> dict:
    """A row's ``filters.ask_llm`` record from its n answers: p_yes (p_no), score, or error."""
    answers = answers or {}
    p_yes, p_no, values, errors = [], [], [], []
    for k in range(n):
        a = answers.get(k, "no score recorded")
        if not isinstance(a, dict):
            p_yes.append(None)
            p_no.append(None)
            errors.append((k, str(a)))
            continue
        y, no = sum(a.get(w, 0.0) for w in config.yes), sum(a.get(w, 0.0) for w in config.no)
        p_yes.append(y)
        p_no.append(no)
        values.append(y / (y + no) if config.no and y + no > 0 else (0.0 if config.no else y))
    record = {"p_yes": p_yes}
    if config.no:
        record["p_no"] = p_no
    if errors:
        record["error"] = f"turn {errors[0][0]}: {errors[0][1]}"
        record["score"] = None
    else:
        record["score"] = REDUCERS[config.reduce](values) if values else None
    return record


def decide(records: dict[str, dict], order: list[str], config: AskLLMConfig) -> dict[str, list[str]]:
    """Drop reasons per scored row id. ``order``: the scored ids in file order (rank ties)."""
    reasons: dict[str, list[str]] = {}
    scored = []
    for pos, row_id in enumerate(order):
        rec = records[row_id]
        if rec.get("error") is not None or rec["score"] is None:
            reasons[row_id] = [f"ask_llm_error {rec.get('error') or 'no prompts'}"]
        else:
            scored.append((-rec["score"], pos, row_id))
    threshold = config.effective_threshold()
    if threshold is not None:
        for neg, _, row_id in scored:
            reasons[row_id] = [] if -neg >= threshold else [f"ask_llm score {-neg:.4f} < {threshold:g}"]
        return reasons
    scored.sort()
    keep = math.ceil(config.keep_top * len(scored) - 1e-9)
    for rank, (neg, _, row_id) in enumerate(scored, 1):
        records[row_id]["rank"] = rank
        reasons[row_id] = [] if rank <= keep else [
            f"ask_llm rank {rank} of {len(scored)} (keep_top {config.keep_top:g})"]
    return reasons


# ----------------------------------------------------------------------------- the URL scorer

class _Lines:
    """Appends whole JSON lines; fsync every 256 lines and at close (a torn last line is cut by
    generate.read_done on the next run)."""

    def __init__(self, path: str):
        self.f = open(path, "a", encoding="utf-8")
        self.n = 0
        self.lock = threading.Lock()

    def write(self, rec: dict) -> None:
        with self.lock:
            self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.f.flush()
            self.n += 1
            if self.n % 256 == 0:
                os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def base_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def word_probs(top: dict, words) -> dict[str, float]:
    """{word: sum of exp(logprob) of the top tokens whose stripped text is the word}."""
    out = {w: 0.0 for w in words}
    for token, logprob in top.items():
        w = token.strip()
        if w in out and logprob is not None:
            out[w] += math.exp(logprob)
    return out


def score_url(url: str, requests_path: str, scores_path: str, config: AskLLMConfig,
              progress: bool | None = None) -> None:
    """Scores every request of ``requests_path`` not yet in ``scores_path`` through ``url``."""
    import concurrent.futures as cf

    import httpx
    from tqdm import tqdm

    from megatron_tanuki.data import templates
    from megatron_tanuki.inference.generate import is_done, parse_requests, read_done
    from megatron_tanuki.runtime.progress import progress_disabled

    base = base_url(url)
    template = templates.get(config.chat or "tanuki")
    words = list(config.yes) + list(config.no)
    key = os.environ.get(config.api_key_env) if config.api_key_env else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    done = read_done(scores_path)
    todo = (p for p in parse_requests(requests_path) if not is_done(p, done))
    client = httpx.Client(headers=headers, timeout=config.timeout_s,
                          limits=httpx.Limits(max_connections=config.concurrency))
    model = config.model or _first_model(client, base)
    out = _Lines(scores_path)
    bar = tqdm(desc="ask-llm", unit="req", file=sys.stderr, disable=progress_disabled(progress), mininterval=0.5)

    def one(p):
        text = "".join(seg for seg, _ in templates.render(template, [("user", p.request["prompt"])], prompt=True))
        body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0, "logprobs": TOP_LOGPROBS}
        for attempt in range(config.retries + 1):
            wait = min(30.0, 0.5 * 2 ** attempt)
            try:
                r = client.post(base + "/completions", json=body)
            except httpx.TransportError as e:
                why = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    return {"id": p.id, "scores": word_probs(_top_logprobs(r, base), words)}
                why = f"HTTP {r.status_code}: {_error_message(r)}"
                if r.status_code in FATAL_STATUS:
                    raise ValueError(f"{base}/completions: {why}")
                if r.status_code != 429 and r.status_code < 500:  # this request is bad (too long, ...)
                    return {"id": p.id, "text": "", "finish_reason": "error", "error": why, "line": p.line}
                wait = _retry_after(r, wait)
            if attempt < config.retries:
                time.sleep(wait)
        raise ValueError(f"{base}/completions failed {config.retries + 1} times ({why}); "
                         f"rerun to resume ({out.n} scored this run)")

    try:
        with cf.ThreadPoolExecutor(config.concurrency) as pool:
            window: set = set()
            for p in todo:
                if p.error is not None:
                    raise ValueError(p.error)  # we wrote the file: a bad line is a bug, not data
                window.add(pool.submit(one, p))
                if len(window) >= 2 * config.concurrency:
                    window = _drain(window, out, bar, cf.FIRST_COMPLETED)
            _drain(window, out, bar, cf.ALL_COMPLETED)
    finally:
        bar.close()
        out.close()
        client.close()


def _drain(window: set, out: _Lines, bar, when) -> set:
    import concurrent.futures as cf

    finished, rest = cf.wait(window, return_when=when)
    for fut in finished:
        out.write(fut.result())  # re-raises a fatal error (the pool's exit waits for the others)
        bar.update(1)
    return rest


def _error_message(r) -> str:
    """An OpenAI-style error's message, else the start of the body."""
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


def _retry_after(r, default: float) -> float:
    try:
        return min(60.0, max(0.0, float(r.headers.get("retry-after", default))))
    except ValueError:
        return default


def _first_model(client, base: str) -> str:
    import httpx

    try:
        r = client.get(base + "/models")
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{base}/models: cannot read the served model's name ({e}); "
                         "set filters.ask_llm.model") from None


def _top_logprobs(r, base: str) -> dict:
    try:
        top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        if not isinstance(top, dict):
            raise TypeError
        return top
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"{base}/completions: the answer has no top log-probs ({r.text[:200]}); the server must "
                         "support \"logprobs\" on /v1/completions") from None

