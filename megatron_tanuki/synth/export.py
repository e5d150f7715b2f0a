"""`tanuki synth export OUT --to hf-dataset DEST`: a synth output folder as a Hugging Face dataset.

What goes in: the rows `tanuki synth filter` kept (``OUT/filtered/data.jsonl``, ``keep: true``) when
OUT has been filtered, else every record of ``OUT/data/*.jsonl`` (file names sorted; a line torn by a
kill is skipped, as everywhere else). What comes out: ``datasets.load_from_disk(DEST)`` gives one row
per conversation with every field of the record, and ``DEST/README.md`` is its dataset card (the
recipe verbatim, the counts, the teacher, the seed prompts' attribution). A filtered/ folder that no
longer covers OUT/data (the run went on after the filter: summary.json's ``rows`` differ from the
whole lines in data/) is refused rather than exported without the new conversations.

Columns. ``messages`` is a list of {role, content}; ``recipe`` is {name, hash}; ``finish_reasons`` and
any other list of strings stay lists. ``sampling`` is kept as JSON text (``json.loads`` gives the record's
dict back), as is any other mapping (the filters' score records): its keys are the recipe's turn names,
so as an Arrow struct its type would differ from recipe to recipe (``sampling.q1.temperature`` here,
``sampling.q.temperature`` there: datasets of two recipes could not be concatenated) and a turn with no
stop strings would give a list of nulls; JSON text is one type for every recipe and loses nothing.
Other columns take their type from the first ``TYPE_ROWS`` rows; a later row that does not fit stops
the export with the file, line and field.

Nothing half-written: the dataset is built with ``Dataset.from_generator`` (streamed to Arrow, bounded
memory; its cache lives in the work folder), saved in ``.DEST.tmp-PID`` beside DEST and renamed into
place when complete; a failed or killed export leaves no DEST (a killed one's work folder is removed by
the next export to the same DEST).
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil

import yaml

TYPE_ROWS = 1000
CONTRACT_KINDS = {"id": "string", "index": "int", "messages": "messages", "teacher": "string", "recipe": "recipe",
                  "sampling": "json", "seed": "int", "finish_reasons": "strings", "created": "string"}
REQUIRED = ("id", "index", "messages")
SEED_PROMPTS = ("The seed prompts -- the shipped seed lists (occupation personas, tasks, topics) and the prompt "
                "wording of the shipped recipes -- come from the Matsuo-lab GENIAC team's public repository "
                "[yuta0x89/nedo_project_code](https://github.com/yuta0x89/nedo_project_code), branch "
                "`team_hatakeyama_phase2` (`ota/topic-hub/`, `ota/topic-hub/synth_topic_multiturn.py`), "
                "Apache-2.0. The team compiled the persona list (`persona_jp`) from the MHLW occupation "
                "classification draft and Wikipedia's 「職業一覧」 (CC-BY-SA-4.0).")
SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))


class ExportError(ValueError):
    """An output folder that cannot be exported; the message names the folder, file, line or field."""


def export_hf_dataset(out_dir: str, dest: str, *, include_rejected: bool = False, overwrite: bool = False) -> dict:
    """Write ``out_dir``'s conversations to ``dest`` (``datasets.save_to_disk`` + README.md).

    ``include_rejected``: also the rows the filters dropped (``keep: false``; their ``keep`` column
    tells them apart) -- for looking at what a threshold removes; needs OUT/filtered. The teacher's
    rejects (OUT/rejects/) are never rows: they are counted on the card. Returns the counts."""
    head, recipe_text = _recipe(out_dir)
    files, filtered = row_sources(out_dir)
    if include_rejected and not filtered:
        raise ExportError(f"{out_dir}: include_rejected keeps the rows `tanuki synth filter` dropped, and this "
                          "folder has no filtered/data.jsonl (run the filter first)")
    summary = filter_summary(out_dir) if filtered else None
    check_fresh(out_dir, summary)
    kinds = _column_kinds(files, filtered, include_rejected)
    if not kinds:
        where = files[0] if filtered else os.path.join(out_dir, "data", "*.jsonl")
        raise ExportError(f"{out_dir}: no conversations to export ({where} holds no "
                          f"{'kept ' if filtered else ''}records)")
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and not overwrite:
        raise ExportError(f"{dest}: exists (--overwrite replaces it)")
    parent, base = os.path.dirname(dest), os.path.basename(dest)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_work(parent, base)
    work = os.path.join(parent, f".{base}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        counts = _build(files, filtered, include_rejected, kinds, os.path.join(work, "dataset"),
                        os.path.join(work, "cache"))
        counts["rejected"] = _count_rejects(out_dir)
        counts["source"] = files[0] if filtered else os.path.join(out_dir, "data")
        counts["filtered"], counts["include_rejected"] = filtered, include_rejected
        counts["json_columns"] = sorted(k for k, v in kinds.items() if v == "json")
        with open(os.path.join(work, "dataset", "README.md"), "w", encoding="utf-8") as f:
            f.write(dataset_card(head, recipe_text, counts, summary))
        _into_place(os.path.join(work, "dataset"), dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    counts["dest"] = dest
    return counts


# ------------------------------------------------------------------------------ reading OUT

def _recipe(out_dir: str) -> tuple[dict, str]:
    path = os.path.join(out_dir, "recipe.yaml")
    if not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir}: no such folder")
    if not os.path.isfile(path):
        raise ExportError(f"{out_dir}: no recipe.yaml -- not a `tanuki synth run` output folder")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    m = re.match(r"# recipe (\S+) hash (\S+)\n", text)
    if not m:
        raise ExportError(f"{path}:1: expected '# recipe NAME hash HASH'")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ExportError(f"{path}: not valid YAML: {e}") from None
    data = data if isinstance(data, dict) else {}
    teacher = data.get("teacher")
    return {"name": m.group(1), "hash": m.group(2), "description": str(data.get("description") or ""),
            "teacher": str(teacher.get("name", "")) if isinstance(teacher, dict) else ""}, text


def row_sources(out_dir: str) -> tuple[list[str], bool]:
    filtered = os.path.join(out_dir, "filtered")
    if os.path.isdir(filtered):
        path = os.path.join(filtered, "data.jsonl")
        if not os.path.isfile(path):
            raise ExportError(f"{filtered}: no data.jsonl (an unfinished `tanuki synth filter`? run it again, or "
                              "remove the folder to export the unfiltered data)")
        return [path], True
    data = os.path.join(out_dir, "data")
    files = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".jsonl")) \
        if os.path.isdir(data) else []
    if not files:
        raise ExportError(f"{out_dir}: no conversations to export (no data/*.jsonl; has `tanuki synth run` "
                          "written anything here?)")
    return files, False


def iter_rows(files: list[str], filtered: bool):
    """(file, line, record, kept) of every row in order: ``kept`` is the filter's keep flag (True unfiltered)."""
    from megatron_tanuki.synth.store import iter_records

    for path in files:
        for n, rec in iter_records(path):
            if not isinstance(rec, dict):
                raise ExportError(f"{path}:{n}: not a JSON object")
            keep = rec.get("keep") if filtered else True
            if not isinstance(keep, bool):
                raise ExportError(f"{path}:{n}: keep: expected true or false, got {keep!r}")
            yield path, n, rec, keep


def _count_rejects(out_dir: str) -> int:
    from megatron_tanuki.synth.store import iter_records

    folder = os.path.join(out_dir, "rejects")
    if not os.path.isdir(folder):
        return 0
    return sum(1 for f in sorted(os.listdir(folder)) if f.endswith(".jsonl")
               for _ in iter_records(os.path.join(folder, f)))


def filter_summary(out_dir: str):
    path = os.path.join(out_dir, "filtered", "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ExportError(f"{path}: not JSON ({e.msg})") from None


def check_fresh(out_dir: str, summary) -> None:
    """filtered/ must cover OUT/data as it is now: a run that went on after the filter would otherwise
    lose its new conversations from the export without a word."""
    if not isinstance(summary, dict) or not isinstance(summary.get("rows"), int):
        return
    now = 0
    data = os.path.join(out_dir, "data")
    for name in sorted(os.listdir(data)) if os.path.isdir(data) else []:
        if name.endswith(".jsonl"):
            with open(os.path.join(data, name), "rb") as f:
                now += sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    if now != summary["rows"]:
        raise ExportError(f"{os.path.join(out_dir, 'filtered')}: filtered {summary['rows']} rows, but data/ holds "
                          f"{now} now: run `tanuki synth filter` again before using its rows")


# ------------------------------------------------------------------------------ columns

def _column_kinds(files, filtered: bool, include_rejected: bool) -> dict:
    """Each column's kind: the contract's fields as declared, the others from the first TYPE_ROWS rows
    (string, bool, int, float, strings (a list of strings), json)."""
    kinds: dict[str, str] = {}
    seen = 0
    for _, _, rec, keep in iter_rows(files, filtered):
        if not keep and not include_rejected:
            continue
        for key, value in rec.items():
            if key in CONTRACT_KINDS:
                kinds[key] = CONTRACT_KINDS[key]
            elif value is not None:
                kinds[key] = _widen(kinds.get(key), _kind(value))
            else:
                kinds.setdefault(key, None)
        seen += 1
        if seen >= TYPE_ROWS:
            break
    return {k: v or "string" for k, v in kinds.items()}


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "strings"
    return "json"


def _widen(a: str | None, b: str) -> str:
    if a is None or a == b:
        return b
    if {a, b} == {"int", "float"}:
        return "float"
    return "json"  # a field whose type varies is kept as JSON text, exactly


def _features(kinds: dict):
    from datasets import Features, List, Value

    string = Value("string")
    types = {"string": string, "json": string, "bool": Value("bool"), "int": Value("int64"),
             "float": Value("float64"), "strings": List(string),
             "messages": List({"role": string, "content": string}), "recipe": {"name": string, "hash": string}}
    return Features({k: types[v] for k, v in kinds.items()})


def _cell(kind: str, value, where: str, required: bool):
    """The record's value as the column stores it; an ExportError naming ``where`` if it does not fit."""
    if kind == "json":
        return json.dumps(value, ensure_ascii=False)
    if value is None:
        if required:
            raise ExportError(f"{where}: missing")
        return None
    ok = {"string": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "strings": lambda v: isinstance(v, list) and all(isinstance(s, str) or s is None for s in v),
          "messages": _is_messages,
          "recipe": lambda v: isinstance(v, dict) and set(v) == {"name", "hash"}
          and all(isinstance(s, str) for s in v.values())}[kind]
    if not ok(value):
        want = {"messages": "a list of {role, content} strings", "recipe": "{name, hash}",
                "strings": "a list of strings", "int": "an integer", "float": "a number"}.get(kind, f"a {kind}")
        got = json.dumps(value, ensure_ascii=False)[:80]
        raise ExportError(f"{where}: expected {want} (as the earlier rows), got {got}")
    return float(value) if kind == "float" else value


def _is_messages(v) -> bool:
    return isinstance(v, list) and all(isinstance(m, dict) and set(m) == {"role", "content"}
                                       and isinstance(m["role"], str) and isinstance(m["content"], str) for m in v)


def _generate(files: list[str], filtered: bool, include_rejected: bool, kinds: dict, counts: dict):
    for path, n, rec, keep in iter_rows(files, filtered):
        counts["filtered_out"] += not keep
        if not keep and not include_rejected:
            continue
        extra = [k for k in rec if k not in kinds]
        if extra:
            raise ExportError(f"{path}:{n}: {extra[0]}: a field the first {TYPE_ROWS} rows do not have (the "
                              "columns come from them)")
        yield {k: _cell(kind, rec.get(k), f"{path}:{n}: {k}", k in REQUIRED) for k, kind in kinds.items()}
        counts["rows"] += 1


def _build(files, filtered, include_rejected, kinds, target: str, cache: str) -> dict:
    import datasets

    counts = collections.Counter(rows=0, filtered_out=0)
    try:
        ds = datasets.Dataset.from_generator(
            _generate, features=_features(kinds), cache_dir=cache,
            gen_kwargs={"files": files, "filtered": filtered, "include_rejected": include_rejected, "kinds": kinds,
                        "counts": counts})
        if len(ds) != counts["rows"]:  # the generator ran in this process, over every row
            raise RuntimeError(f"exported {len(ds)} rows but read {counts['rows']}")
        ds.save_to_disk(target)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ExportError):
            raise cause from None
        raise
    return dict(counts)


def _remove_stale_work(parent: str, base: str) -> None:
    """Work folders of exports to the same DEST whose process is gone (killed)."""
    prefix = f".{base}.tmp-"
    for name in os.listdir(parent):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            pid = int(name[len(prefix):])
            try:
                os.kill(pid, 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _into_place(built: str, dest: str) -> None:
    if not os.path.exists(dest):
        os.rename(built, dest)
        return
    old = f"{built}.old"
    os.rename(dest, old)
    os.rename(built, dest)
    shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


# ------------------------------------------------------------------------------ the card

def size_category(n: int) -> str:
    for bound, name in SIZES:
        if n < bound:
            return name
    return "n>1B"


def dataset_card(head: dict, recipe_text: str, counts: dict, filter_summary=None) -> str:
    """README.md of the exported dataset: Hugging Face front matter, then what made it."""
    name, teacher = head["name"], head["teacher"] or "unknown"
    front = {"license": "apache-2.0", "language": ["ja"], "task_categories": ["text-generation"],
             "size_categories": [size_category(counts["rows"])], "pretty_name": name,
             "tags": ["synthetic", "multi-turn", "tanuki-synth"]}
    lines = ["---", yaml.safe_dump(front, allow_unicode=True, sort_keys=False).rstrip(), "---", "",
             f"# {name}", ""]
    if head["description"]:
        lines += [head["description"], ""]
    lines += [f"Synthetic multi-turn conversations made with `tanuki synth run` (megatron_tanuki) from the recipe "
              f"below; teacher: **{teacher}**.", "",
              "| | |", "|---|---|",
              f"| recipe | `{name}` |", f"| recipe hash | `{head['hash']}` |", f"| teacher | {teacher} |",
              f"| rows | {counts['rows']} |",
              f"| rejected by the pipeline (teacher answers that failed their rules after every retry; not in "
              f"the rows) | {counts['rejected']} |"]
    if counts.get("filtered"):
        also = " (included here as rows with `keep: false`)" if counts.get("include_rejected") else ""
        lines.append(f"| filtered out by `tanuki synth filter`{also} | {counts['filtered_out']} |")
        by_reason = (filter_summary or {}).get("dropped_by_reason") if isinstance(filter_summary, dict) else None
        if isinstance(by_reason, dict):
            lines += [f"| &nbsp;&nbsp;filtered out: {reason} | {n} |" for reason, n in by_reason.items()]
    lines.append("")
    if filter_summary is not None:
        lines += ["## Filtering", "", "`tanuki synth filter`'s summary (filtered/summary.json), with the rows "
                  "dropped by reason:", "", "```json", json.dumps(filter_summary, ensure_ascii=False, indent=1),
                  "```", ""]
    lines += ["## Columns", "",
              "`messages` (user, assistant, user, assistant: `{role, content}`), `id` (a stable hash of the recipe "
              "and the conversation's index), `index`, the recipe's seed variables (e.g. `persona`, `task`, "
              "`topic`), `teacher`, `recipe` (`{name, hash}`), `seed`, `finish_reasons`, `created`."]
    if counts.get("json_columns"):
        lines.append("Stored as JSON text (`json.loads` gives the record's value back): "
                     + ", ".join(f"`{c}`" for c in counts["json_columns"]) + ".")
    lines += ["", "## License", "",
              "The prompts (the recipe, its seed lists and templates) are Apache-2.0. The conversations' text was "
              f"written by the teacher model ({teacher}): check the teacher's license and terms of use for "
              "generated data before you publish or train on this dataset -- they are yours to check, not "
              "recorded here.", "",
              "## Attribution", "", SEED_PROMPTS, "",
              "## Recipe", "", f"`{name}`, hash `{head['hash']}`, as run (OUT/recipe.yaml):", ""]
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", recipe_text)), default=0))
    lines += [fence + "yaml", recipe_text.rstrip("\n"), fence, ""]
    return "\n".join(lines)
