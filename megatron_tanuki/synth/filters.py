"""`tanuki synth filter OUT`: dedup, the Japanese check and Ask-LLM over a run's data, reasons recorded.

The seed team ran these as a chain of shell steps, each rewriting the data and forgetting why a row
went. Here each step adds a column and drop reasons to every row, nothing is deleted, and the output
says what was dropped by which step:

- OUT/filtered/data.jsonl: every row of OUT/data/*.jsonl (files in name order, lines in order) with
  ``"filters": {"dedup": {...}, "lang": {...}, "ask_llm": {...}}`` (the steps that ran on it),
  ``"keep"`` and ``"drop_reasons"``.
- OUT/filtered/summary.json: rows, kept, dropped, rows dropped per reason kind, the settings.
Both are written under a temporary name and renamed when complete.

Steps run in this order: dedup (dedup.py), lang (japanese.py), ask_llm (ask_llm.py). Dedup and the
Japanese check see every row (a duplicate of a row that fails the Japanese check is still a
duplicate); Ask-LLM scores only the rows both kept, so the scorer's time goes to rows that can survive.

Memory is what dedup keeps per row (~2.4 KB measured, dedup.py), the ids seen (~0.15 KB a row, to
refuse an id twice) and, with Ask-LLM, the scores (~0.5 KB per scored row): never the rows' text. Two passes over
the files: pass 1 decides dedup and lang and writes the scorer's requests, pass 2 joins the
decisions (a small side file, one line a row) with the rows.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

from megatron_tanuki.synth.ask_llm import REDUCERS, AskLLMConfig
from megatron_tanuki.synth.dedup import DedupConfig
from megatron_tanuki.synth.japanese import LangConfig

LANGS = ("ja",)
YAML_BOOL_KEYS = {True: "yes", False: "no"}


@dataclass(frozen=True)
class FilterConfig:
    """A recipe's ``filters:`` section: the settings of each step (which steps run is the caller's)."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    lang: LangConfig = field(default_factory=LangConfig)
    ask_llm: AskLLMConfig = field(default_factory=AskLLMConfig)

    @classmethod
    def from_dict(cls, d: dict | None, where: str) -> "FilterConfig":
        """``where``: the recipe file, for errors ("recipe.yaml: filters.dedupe: unknown field ...")."""
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ValueError(f"{where}: filters: must be a mapping of dedup, lang, ask_llm")
        _unknown(d, ("dedup", "lang", "ask_llm"), where, "filters")
        return cls(dedup=_dedup(d.get("dedup"), where), lang=_lang(d.get("lang"), where),
                   ask_llm=_ask_llm(d.get("ask_llm"), where))

    @classmethod
    def of_run(cls, out_dir: str) -> "FilterConfig":
        """The ``filters:`` section of OUT/recipe.yaml (defaults when there is none)."""
        import yaml

        path = os.path.join(out_dir, "recipe.yaml")
        if not os.path.exists(path):
            return cls()
        with open(path, encoding="utf-8") as f:
            try:
                recipe = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML ({e})") from None
        if recipe is not None and not isinstance(recipe, dict):
            raise ValueError(f"{path}: a recipe must be a mapping")
        return cls.from_dict((recipe or {}).get("filters"), path)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ask_llm"]["yes"], d["ask_llm"]["no"] = list(self.ask_llm.yes), list(self.ask_llm.no)
        return d


# ----------------------------------------------------------------------------- validation

def _unknown(d: dict, known, where: str, prefix: str) -> None:
    for key in d:
        if key not in known:
            raise ValueError(f"{where}: {prefix}.{key}: unknown field (known: {', '.join(known)})")


def _section(cls, d, where: str, name: str, checks: dict) -> dict:
    """The section's fields after their checks: {field: (ok(value) -> bool, what it must be)}."""
    if d is None:
        return {}
    prefix = f"filters.{name}"
    if not isinstance(d, dict):
        raise ValueError(f"{where}: {prefix}: must be a mapping of {', '.join(f.name for f in fields(cls))}")
    _unknown(d, [f.name for f in fields(cls)], where, prefix)
    out = {}
    for key, value in d.items():
        ok, what = checks[key]
        if not ok(value):
            raise ValueError(f"{where}: {prefix}.{key}: must be {what}, got {value!r}")
        out[key] = value
    return out


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _words(v) -> bool:
    return isinstance(v, list) and all(isinstance(w, str) and w for w in v)


def _opt_str(v) -> bool:
    return v is None or (isinstance(v, str) and bool(v))


def _dedup(d, where: str) -> DedupConfig:
    return DedupConfig(**_section(DedupConfig, d, where, "dedup", {
        "ngram": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
        "threshold": (lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]"),
        "num_perm": (lambda v: _int(v) and 16 <= v <= 1024, "an integer in [16, 1024]"),
    }))


def _lang(d, where: str) -> LangConfig:
    return LangConfig(**_section(LangConfig, d, where, "lang", {
        "min_share": (lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "tail_share": (lambda v: _num(v) and 0 <= v <= 1, "a number in [0, 1]"),
        "drop_translation_tail": (lambda v: isinstance(v, bool), "true or false"),
    }))


def _ask_llm(d, where: str) -> AskLLMConfig:
    from megatron_tanuki.data import templates

    def chat_ok(v):
        if v is None:
            return True
        try:
            return isinstance(v, str) and templates.get(v) is not None
        except ValueError:
            return False

    if isinstance(d, dict):  # YAML 1.1 (PyYAML) reads an unquoted yes:/no: key as true/false
        d = {YAML_BOOL_KEYS.get(k, k) if isinstance(k, bool) else k: v for k, v in d.items()}
    words = "a list of words (quote yes/no: unquoted, YAML reads them as true/false)"
    values = _section(AskLLMConfig, d, where, "ask_llm", {
        "prompt": (lambda v: isinstance(v, str) and bool(v), "a text with {conversation}"),
        "yes": (_words, words),
        "no": (_words, words),
        "chat": (chat_ok, f"a conversation template ({', '.join(sorted(templates.TEMPLATES))})"),
        "reduce": (lambda v: v in REDUCERS, f"one of {', '.join(REDUCERS)}"),
        "threshold": (lambda v: v is None or (_num(v) and 0 <= v <= 1), "a number in [0, 1]"),
        "keep_top": (lambda v: v is None or (_num(v) and 0 < v <= 1), "a fraction in (0, 1]"),
        "tokenizer": (_opt_str, "a tokenizer path"),
        "kv_memory_gb": (lambda v: v is None or (_num(v) and v > 0), "a positive number"),
        "model": (_opt_str, "a model name"),
        "api_key_env": (_opt_str, "an environment variable name"),
        "concurrency": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
        "timeout_s": (lambda v: _num(v) and v > 0, "a positive number"),
        "retries": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    })
    if "prompt" in values:
        _check_prompt(values["prompt"], where)
    for key in ("yes", "no"):
        if key in values:
            values[key] = tuple(values[key])
    config = AskLLMConfig(**values)
    if config.threshold is not None and config.keep_top is not None:
        raise ValueError(f"{where}: filters.ask_llm: give threshold or keep_top, not both")
    return config


def _check_prompt(prompt: str, where: str) -> None:
    from megatron_tanuki.synth.ask_llm import prompt_fields

    try:
        names = prompt_fields(prompt)
    except ValueError as e:
        raise ValueError(f"{where}: filters.ask_llm.prompt: {e} (write {{{{ and }}}} for literal braces)") from None
    if names != {"conversation"}:
        other = sorted(names - {"conversation"})
        raise ValueError(f"{where}: filters.ask_llm.prompt: "
                         + (f"names {', '.join('{' + n + '}' for n in other)}; only {{conversation}} is defined"
                            if other else "must contain {conversation}"))


# ----------------------------------------------------------------------------- reading rows

def data_files(out_dir: str) -> list[str]:
    folder = os.path.join(out_dir, "data")
    if not os.path.isdir(folder):
        raise FileNotFoundError(2, "no data folder (is this a `tanuki synth run` output?)", folder)
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".jsonl"))
    if not files:
        raise FileNotFoundError(2, "no *.jsonl files", folder)
    return files


def read_rows(files: list[str]):
    """(file, line number, row) for every non-empty line; a bad line stops the filter."""
    for path in files:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{n}"
                if not raw.endswith(b"\n"):
                    raise ValueError(f"{where}: a torn last line (a run was killed mid-write; rerun `tanuki synth "
                                     "run` on this output to finish it)")
                try:
                    row = json.loads(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as e:
                    raise ValueError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line)") from None
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not a JSON line ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                    raise ValueError(f"{where}: a record without a string \"id\"")
                messages = row.get("messages")
                if not (isinstance(messages, list) and messages and all(
                        isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                        for m in messages)):
                    raise ValueError(f"{where} (id {row['id']}): \"messages\" must be a non-empty list of "
                                     "{\"role\", \"content\"}")
                yield path, n, row


def first_question(messages: list[dict]) -> str:
    return next((m["content"] for m in messages if m["role"] == "user"), "")


def reason_kind(reason: str) -> str:
    word = reason.split(" ", 1)[0]
    return word[:-3] if word.endswith("_of") else word


# ----------------------------------------------------------------------------- the filter

def run_filter(out_dir: str, *, dedup: bool, lang: str | None, ask_llm: str | None,
               config: FilterConfig | None = None, threshold: float | None = None, keep_top: float | None = None,
               tp: int = 1, pp: int = 1, ep: int = 1, nproc: int | None = None,
               progress: bool | None = None) -> dict:
    """Runs the chosen steps over OUT/data/*.jsonl; writes OUT/filtered/{data.jsonl, summary.json};
    returns the summary. ``config``: None reads OUT/recipe.yaml's ``filters:``. ``threshold`` /
    ``keep_top`` (the CLI's) replace the recipe's Ask-LLM rule. ``ask_llm``: a checkpoint folder or
    an http(s) URL of an OpenAI-compatible server. ``tp/pp/ep/nproc``: the checkpoint scorer's layout."""
    from megatron_tanuki.synth import ask_llm as ask

    t0 = time.perf_counter()
    if not (dedup or lang or ask_llm):
        raise ValueError("nothing to do: give --dedup, --lang ja and/or --ask-llm CKPT_OR_URL")
    if lang is not None and lang not in LANGS:
        raise ValueError(f"--lang {lang}: only {', '.join(LANGS)} is supported (the Japanese check)")
    config = _with_rule(FilterConfig.of_run(out_dir) if config is None else config, threshold, keep_top)
    if ask_llm:
        ask.check_words(ask_llm, config.ask_llm, os.path.join(out_dir, "recipe.yaml"))
    files = data_files(out_dir)
    folder = os.path.join(out_dir, "filtered")
    os.makedirs(folder, exist_ok=True)
    decisions = os.path.join(folder, "decisions.jsonl.tmp")
    data_path = os.path.join(folder, "data.jsonl")
    work = ask.ScoreWork(os.path.join(folder, "ask_llm"), ask_llm, config.ask_llm) if ask_llm else None
    try:
        rows, scored = _first_pass(files, decisions, dedup, bool(lang), work, config, progress)
        ask_records, ask_reasons = {}, {}
        if work is not None:
            work.finish_requests()
            work.run(tp=tp, pp=pp, ep=ep, nproc=nproc, progress=progress)
            answers = work.read() if work.count else {}
            for rid, k in scored:
                ask_records[rid] = ask.row_result(answers.pop(rid, None), k, config.ask_llm)
            del answers
            ask_reasons = ask.decide(ask_records, [rid for rid, _ in scored], config.ask_llm)
        kept, by_kind = _second_pass(files, decisions, data_path + ".tmp", rows, ask_records, ask_reasons)
    finally:
        for tmp in (decisions, data_path + ".tmp"):
            if os.path.exists(tmp):
                os.remove(tmp)
        if work is not None:
            work.cleanup()
    steps = [name for name, on in (("dedup", dedup), ("lang", lang), ("ask_llm", ask_llm)) if on]
    summary = {"rows": rows, "kept": kept, "dropped": rows - kept, "dropped_by_reason": dict(sorted(by_kind.items())),
               "steps": steps, "inputs": [os.path.relpath(p, out_dir) for p in files],
               "config": {k: v for k, v in config.to_dict().items() if k in steps},
               "seconds": round(time.perf_counter() - t0, 2)}
    if ask_llm:
        a = config.ask_llm
        summary["ask_llm"] = {"scorer": ask_llm, "scored_rows": len(scored),
                              "rule": {"keep_top": a.keep_top} if a.keep_top is not None
                              else {"threshold": a.effective_threshold()}}
    summary_path = os.path.join(folder, "summary.json")
    with open(summary_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(summary_path + ".tmp", summary_path)
    return summary


def _with_rule(config: FilterConfig, threshold: float | None, keep_top: float | None) -> FilterConfig:
    """The command line's --threshold / --keep-top in place of the recipe's rule."""
    if threshold is None and keep_top is None:
        return config
    if threshold is not None and keep_top is not None:
        raise ValueError("--threshold and --keep-top: give one")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"--threshold {threshold}: must be in [0, 1]")
    if keep_top is not None and not 0 < keep_top <= 1:
        raise ValueError(f"--keep-top {keep_top}: must be in (0, 1]")
    return replace(config, ask_llm=replace(config.ask_llm, threshold=threshold, keep_top=keep_top))


def _first_pass(files, decisions: str, dedup: bool, lang: bool, work, config: FilterConfig, progress):
    """Dedup and lang over every row in order, one decision line a row; the scorer's requests for
    the rows both keep. Returns (rows, [(row id, prompts) of the scored rows])."""
    from megatron_tanuki.synth.dedup import Deduplicator
    from megatron_tanuki.synth.japanese import check as japanese_check

    deduper = Deduplicator(config.dedup) if dedup else None
    names = [os.path.basename(p) for p in files]
    seen: dict[str, int] = {}  # id -> its file's index
    current, index = None, 0
    scored: list[tuple[str, int]] = []
    rows = 0
    bar = _bar("filter", progress)
    with open(decisions, "w", encoding="utf-8") as dec:
        for path, n, row in read_rows(files):
            rid = row["id"]
            if rid in seen:
                raise ValueError(f"{path}:{n}: id {rid} again (first in {names[seen[rid]]}); join shards with "
                                 "`tanuki synth merge`, which checks every id is there once")
            if path != current:
                current, index = path, files.index(path)
            seen[rid] = index
            out, reasons = {}, []
            if deduper is not None:
                out["dedup"], why = deduper.check(rid, first_question(row["messages"]))
                reasons += why
            if lang:
                out["lang"], why = japanese_check(row["messages"], config.lang)
                reasons += why
            if work is not None and not reasons:
                scored.append((rid, work.add(rid, row["messages"])))
            dec.write(json.dumps({"id": rid, "filters": out, "reasons": reasons}, ensure_ascii=False) + "\n")
            rows += 1
            bar.update(1)
    bar.close()
    return rows, scored


def _second_pass(files, decisions: str, tmp: str, rows: int, ask_records: dict, ask_reasons: dict):
    """Every row with its decisions into ``tmp``, renamed to the final name when complete.
    Returns (kept, rows dropped per reason kind)."""
    kept, by_kind, done = 0, {}, 0
    with open(decisions, encoding="utf-8") as dec, open(tmp, "w", encoding="utf-8") as out:
        for (path, n, row), line in zip(read_rows(files), dec):
            d = json.loads(line)
            if d["id"] != row["id"]:
                raise ValueError(f"{path}:{n}: id {row['id']} where the first pass read {d['id']}: the data changed "
                                 "while it was filtered; run the filter again")
            reasons = d["reasons"]
            if row["id"] in ask_records:
                d["filters"]["ask_llm"] = ask_records.pop(row["id"])
                reasons = reasons + ask_reasons[row["id"]]
            keep = not reasons
            kept += keep
            for kind in dict.fromkeys(reason_kind(r) for r in reasons):
                by_kind[kind] = by_kind.get(kind, 0) + 1
            row.update(filters=d["filters"], keep=keep, drop_reasons=reasons)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            done += 1
        out.flush()
        os.fsync(out.fileno())
    if done != rows:
        raise ValueError(f"{os.path.dirname(files[0])}: {done} rows on the second pass, {rows} on the first: the data "
                         "changed while it was filtered; run the filter again")
    os.replace(tmp, os.path.join(os.path.dirname(tmp), "data.jsonl"))
    return kept, by_kind


def _bar(desc: str, progress: bool | None):
    from tqdm import tqdm

    from megatron_tanuki.runtime.progress import progress_disabled

    return tqdm(desc=desc, unit="row", file=sys.stderr, disable=progress_disabled(progress), mininterval=0.5)
