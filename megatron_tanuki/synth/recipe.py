"""A synthetic-data recipe: one YAML file that says everything a run does (`tanuki synth run RECIPE`).

Seed lists (shipped topic-hub lists, any JSONL, a Hugging Face dataset) are combined into conversation
*slots* -- slot ``i`` always gets the same seed values, id and sampling seeds -- and each slot runs the
recipe's turns in order against a teacher. Everything is checked when the file is read, and every
error names the file and the field (``recipe.yaml: turns[2].prompt[0].content: {q3} is not defined``),
so a mistake costs seconds, not a night of teacher time.

Ids: ``sha256(recipe hash : slot)``; the recipe hash covers what decides a conversation's text (seeds,
how they combine, teacher, turns, sampling, retries), not ``count`` (raising it extends a run) nor the
filter / DPO / caption sections. Each turn's sampling seed derives from the id, the turn and the
attempt: distinct slots never share a seed (the seed team's single fixed seed made identical prompts
give identical conversations), and a rerun reproduces.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import re
import string
from dataclasses import dataclass, field

import yaml

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "assets", "topic-hub")
ROLES = ("user", "assistant")
FLAGS = {"DOTALL": re.DOTALL, "MULTILINE": re.MULTILINE, "IGNORECASE": re.IGNORECASE}
SAMPLING_KEYS = ("temperature", "top_p", "max_tokens")
# fields of the data and reject records: a seed variable of the same name would overwrite them
RESERVED = {"id", "index", "messages", "teacher", "recipe", "sampling", "seed", "finish_reasons", "created", "turn",
            "reason", "attempts", "failures"}


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file and the field."""


@dataclass
class SeedList:
    name: str                 # the template variable and the record field
    source: str
    field: str
    values: list[str]
    cum_weights: list[float] | None = None   # sampled combination with a weight field


@dataclass
class Cleanup:
    pattern: re.Pattern
    replace: str = ""


@dataclass
class Turn:
    name: str                 # the variable later turns use ({q1}) and the key in "sampling"
    role: str                 # the role its text takes in the record's messages
    prompt: list[dict]        # [{"role", "content" template}] sent to the teacher
    sampling: dict            # temperature, top_p, max_tokens
    stop: tuple[str, ...] = ()
    require: re.Pattern | None = None      # the raw answer must match (re.search), else retried
    cleanup: list[Cleanup] = field(default_factory=list)
    allow_truncated: bool = False          # an answer cut by max_tokens is retried unless allowed


@dataclass
class Teacher:
    name: str
    chat: str | None = None   # our template for the in-process engine; None: the architecture's default
    system: str | None = None  # a system message first in every request (None: none)
    stop: tuple[str, ...] = ()


@dataclass
class Recipe:
    name: str
    path: str
    count: int
    teacher: Teacher
    seeds: list[SeedList]
    combine: str
    turns: list[Turn]
    retries: int
    hash: str
    text: str                              # the YAML as read
    description: str = ""
    filters: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)
    captions: dict = field(default_factory=dict)

    # -- slots ---------------------------------------------------------------------------------
    def conversation_id(self, index: int) -> str:
        return hashlib.sha256(f"{self.hash}:{index}".encode()).hexdigest()[:16]

    def variables(self, index: int) -> dict:
        """The seed values of slot ``index`` (deterministic)."""
        if self.combine == "product":
            out, rest = {}, index
            for s in reversed(self.seeds):  # the last list varies fastest, like itertools.product
                rest, k = divmod(rest, len(s.values))
                out[s.name] = s.values[k]
            return {s.name: out[s.name] for s in self.seeds}
        out = {}
        for s in self.seeds:
            u = _unit(f"{self.hash}:{index}:{s.name}")
            if s.cum_weights is None:
                out[s.name] = s.values[int(u * len(s.values))]
            else:
                k = bisect.bisect_right(s.cum_weights, u * s.cum_weights[-1])
                out[s.name] = s.values[min(k, len(s.values) - 1)]
        return out

    @property
    def combinations(self) -> int:
        return _product(len(s.values) for s in self.seeds)


def conversation_seed(cid: str) -> int:
    return int(cid[:8], 16) & 0x7FFFFFFF


def turn_seed(cid: str, turn: str, attempt: int) -> int:
    return int(hashlib.sha256(f"{cid}:{turn}:{attempt}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def render(template: str, variables: dict) -> str:
    return template.format_map(variables)


def _unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:13], 16) / 16 ** 13


def _product(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


# -------------------------------------------------------------------------- reading

RECIPE_KEYS = {"name", "description", "count", "teacher", "seeds", "combine", "sampling", "retries", "turns",
               "filters", "dpo", "captions"}
TEACHER_KEYS = {"name", "chat", "system", "stop"}
SEED_KEYS = {"source", "field", "weight_field", "limit"}
TURN_KEYS = {"name", "role", "prompt", "sampling", "stop", "require", "cleanup", "allow_truncated"}


def _read_yaml(path: str):
    """(parsed YAML, text) of a recipe file; a missing file or bad YAML names the file."""
    if not os.path.isfile(path):
        raise RecipeError(f"{path}: recipe file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return yaml.safe_load(text), text
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None


def load_recipe(path: str) -> Recipe:
    data, text = _read_yaml(path)
    return parse_recipe(data, path, text)


def parse_recipe(data, path: str, text: str = "") -> Recipe:
    r = Reader(path)
    d = r.mapping(data, "", RECIPE_KEYS, required=("name", "teacher", "seeds", "turns"))
    name = r.string(d["name"], "name")
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise r.error("name", f"{name!r}: letters, digits, '_', '-', '.' only (it names files)")
    count = d.get("count", 1000)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise r.error("count", f"{count!r}: a positive integer")
    teacher = _teacher(r, d["teacher"])
    seeds = _seeds(r, d["seeds"], os.path.dirname(os.path.abspath(path)), d.get("combine", "sampled"))
    combine = d.get("combine", "sampled")
    if combine not in ("product", "sampled"):
        raise r.error("combine", f"{combine!r}: one of product, sampled")
    defaults = read_sampling(r, d.get("sampling", {}), "sampling", {"temperature": 0.7, "top_p": 1.0, "max_tokens": 512})
    retries = d.get("retries", 3)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise r.error("retries", f"{retries!r}: an integer >= 0")
    turns = _turns(r, d["turns"], [s.name for s in seeds], defaults)
    for key in ("filters", "dpo", "captions"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise r.error(key, "must be a mapping")
    from megatron_tanuki.synth.filters import FilterConfig

    FilterConfig.from_dict(d.get("filters"), path)  # a bad filters: section fails now, not after the run
    # the values themselves, not only where they come from: an edited seed file is another recipe
    seed_values = hashlib.sha256(json.dumps([[s.values, s.cum_weights] for s in seeds], ensure_ascii=False)
                                 .encode()).hexdigest()
    identity = {"name": name, "teacher": d["teacher"], "seeds": d["seeds"], "seed_values": seed_values,
                "combine": combine,
                "sampling": d.get("sampling", {}), "retries": retries, "turns": d["turns"]}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return Recipe(name=name, path=os.path.abspath(path), count=count, teacher=teacher, seeds=seeds, combine=combine,
                  turns=turns, retries=retries, hash=digest, text=text, description=d.get("description") or "",
                  filters=d.get("filters") or {}, dpo=d.get("dpo") or {}, captions=d.get("captions") or {})


@dataclass
class Section:
    """One tool's section of a recipe (``dpo``, ``captions``) and the recipe's name, path and text."""
    name: str
    path: str
    text: str
    section: dict
    description: str = ""


def load_section(path: str, key: str) -> Section:
    """A recipe's ``key:`` section. A full recipe (teacher, seeds, turns) is validated whole; a recipe
    for that tool alone holds only ``name``, ``description`` and the section."""
    data, text = _read_yaml(path)
    r = Reader(path)
    if isinstance(data, dict) and {"teacher", "seeds", "turns"} & set(data):
        full = parse_recipe(data, path, text)
        name, description = full.name, full.description
    else:
        d = r.mapping(data, "", {"name", "description", key}, required=("name",))
        name, description = r.string(d["name"], "name"), d.get("description") or ""
    section = data.get(key)
    if not section:
        raise r.error(key, f"missing: the recipe has no {key} section")
    if not isinstance(section, dict):
        raise r.error(key, "must be a mapping")
    return Section(name=name, path=os.path.abspath(path), text=text, section=section, description=description)


class Reader:
    def __init__(self, path: str):
        self.path = path

    def error(self, where: str, what: str) -> RecipeError:
        return RecipeError(f"{self.path}: {where}: {what}" if where else f"{self.path}: {what}")

    def mapping(self, value, where: str, known: set, required=()) -> dict:
        if not isinstance(value, dict):
            raise self.error(where, "must be a mapping")
        for k in value:
            if k not in known:
                raise self.error(f"{where}.{k}" if where else str(k),
                                 f"unknown field (known: {', '.join(sorted(known))})")
        for k in required:
            if k not in value:
                raise self.error(f"{where}.{k}" if where else k, "missing (required)")
        return value

    def string(self, value, where: str, empty_ok: bool = False) -> str:
        if not isinstance(value, str) or (not empty_ok and not value):
            raise self.error(where, f"{value!r}: a {'' if empty_ok else 'non-empty '}string")
        return value

    def strings(self, value, where: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise self.error(where, "a list of non-empty strings")
        return tuple(value)

    def regex(self, value, where: str, flags: int = 0) -> re.Pattern:
        self.string(value, where)
        try:
            return re.compile(value, flags)
        except re.error as e:
            raise self.error(where, f"{value!r}: not a valid regular expression ({e})") from None


def _teacher(r: Reader, value) -> Teacher:
    d = r.mapping(value, "teacher", TEACHER_KEYS, required=("name",))
    t = Teacher(name=r.string(d["name"], "teacher.name"), stop=r.strings(d.get("stop"), "teacher.stop"))
    if d.get("chat") is not None:
        from megatron_tanuki.data import templates

        t.chat = r.string(d["chat"], "teacher.chat")
        try:
            template = templates.get(t.chat)
        except ValueError as e:
            raise r.error("teacher.chat", str(e)) from None
        if d.get("system") is not None and not template.system_turn:
            raise r.error("teacher.system", f"the {t.chat} template has no system turn")
    if d.get("system") is not None:
        t.system = r.string(d["system"], "teacher.system", empty_ok=True)
    return t


def _seeds(r: Reader, value, base: str, combine: str) -> list[SeedList]:
    if not isinstance(value, dict) or not value:
        raise r.error("seeds", "a mapping of variable name -> {source, field}")
    out = []
    for name, spec in value.items():
        where = f"seeds.{name}"
        if not isinstance(name, str) or not name.isidentifier():
            raise r.error(where, "a variable name must be an identifier")
        if name in RESERVED:
            raise r.error(where, f"{name!r} is a field of every record ({', '.join(sorted(RESERVED))}); "
                          "name the variable otherwise")
        d = r.mapping(spec, where, SEED_KEYS, required=("source",))
        source = r.string(d["source"], f"{where}.source")
        fld = r.string(d.get("field", name), f"{where}.field")
        weight_field = d.get("weight_field")
        limit = d.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise r.error(f"{where}.limit", f"{limit!r}: a positive integer (the first N rows)")
        if weight_field is not None and combine != "sampled":
            raise r.error(f"{where}.weight_field", "weights apply to combine: sampled")
        rows = _rows(r, source, f"{where}.source", base)
        values, weights = [], []
        for origin, row in rows:
            if not isinstance(row, dict) or not isinstance(row.get(fld), str) or not row[fld].strip():
                raise r.error(f"{where}.field", f"{origin}: no string field {fld!r}")
            values.append(row[fld].strip())
            if weight_field is not None:
                w = row.get(weight_field)
                if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
                    raise r.error(f"{where}.weight_field", f"{origin}: {weight_field!r} must be a number >= 0")
                weights.append(float(w))
            if limit is not None and len(values) >= limit:
                break
        if not values:
            raise r.error(f"{where}.source", f"{source}: no rows")
        cum = list(itertools.accumulate(weights)) if weight_field is not None else None
        if cum is not None and cum[-1] <= 0:
            raise r.error(f"{where}.weight_field", "all weights are 0")
        out.append(SeedList(name, source, fld, values, cum))
    return out


def _rows(r: Reader, source: str, where: str, base: str):
    """(origin, row) pairs of a seed source: ``builtin:NAME`` (the shipped topic-hub lists),
    ``hf:NAME[:SPLIT]`` (datasets: a saved folder or a hub dataset), or a JSONL path (relative to
    the recipe)."""
    if source.startswith("hf:"):
        return _hf_rows(r, source[3:], where, base)
    if source.startswith("builtin:"):
        path = os.path.join(ASSETS, source[len("builtin:"):] + ".jsonl")
        if not os.path.isfile(path):
            known = sorted(f[:-6] for f in os.listdir(ASSETS) if f.endswith(".jsonl"))
            raise r.error(where, f"{source}: no such shipped list (known: {', '.join('builtin:' + k for k in known)})")
    else:
        path = source if os.path.isabs(source) else os.path.join(base, source)
        if not os.path.isfile(path):
            raise r.error(where, f"{path}: seed file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise r.error(where, f"{path}:{n}: not a JSON line ({e.msg})") from None
    return rows


def _hf_rows(r: Reader, spec: str, where: str, base: str):
    name, _, split = spec.partition(":")
    import datasets

    local = name if os.path.isabs(name) else os.path.join(base, name)
    try:
        if os.path.isdir(local):
            ds = datasets.load_from_disk(local)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split or next(iter(ds))]
        else:
            ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - any loader failure is the recipe's source field
        raise r.error(where, f"hf:{spec}: cannot load ({type(e).__name__}: {e})") from None
    return ((f"hf:{spec}[{i}]", row) for i, row in enumerate(ds))


def read_sampling(r: Reader, value, where: str, defaults: dict) -> dict:
    d = r.mapping(value, where, set(SAMPLING_KEYS))
    out = dict(defaults)
    for k, v in d.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise r.error(f"{where}.{k}", f"{v!r}: a number")
        out[k] = v
    if out["temperature"] < 0 or not 0 < out["top_p"] <= 1 or int(out["max_tokens"]) != out["max_tokens"] \
            or out["max_tokens"] < 1:
        raise r.error(where, "temperature >= 0, 0 < top_p <= 1, max_tokens a positive integer")
    out["max_tokens"] = int(out["max_tokens"])
    return out


def _turns(r: Reader, value, seed_names: list[str], defaults: dict) -> list[Turn]:
    if not isinstance(value, list) or not value:
        raise r.error("turns", "a non-empty list")
    defined, out = list(seed_names), []
    for i, spec in enumerate(value):
        where = f"turns[{i}]"
        d = r.mapping(spec, where, TURN_KEYS, required=("name", "role", "prompt"))
        name = r.string(d["name"], f"{where}.name")
        if not name.isidentifier() or name in defined:
            raise r.error(f"{where}.name", f"{name!r}: an identifier not used by a seed or an earlier turn")
        role = d["role"]
        if role not in ROLES:
            raise r.error(f"{where}.role", f"{role!r}: one of {', '.join(ROLES)}")
        want = ROLES[i % 2]
        if role != want:
            raise r.error(f"{where}.role", f"the record's turns alternate user, assistant: turn {i} is {want}")
        prompt = d["prompt"]
        if not isinstance(prompt, list) or not prompt:
            raise r.error(f"{where}.prompt", "a non-empty list of {role, content}")
        for k, m in enumerate(prompt):
            mw = f"{where}.prompt[{k}]"
            r.mapping(m, mw, {"role", "content"}, required=("role", "content"))
            if m["role"] not in ROLES:
                raise r.error(f"{mw}.role", f"{m['role']!r}: one of {', '.join(ROLES)} (the system message is "
                              "teacher.system)")
            _check_template(r, r.string(m["content"], f"{mw}.content"), f"{mw}.content", defined)
        if prompt[-1]["role"] != "user":
            raise r.error(f"{where}.prompt", "must end with a user message")
        flags = 0
        cleanup = []
        for k, c in enumerate(d.get("cleanup") or []):
            cw = f"{where}.cleanup[{k}]"
            c = r.mapping(c, cw, {"pattern", "replace", "flags"}, required=("pattern",))
            flags = 0
            for fl in c.get("flags") or []:
                if fl not in FLAGS:
                    raise r.error(f"{cw}.flags", f"{fl!r}: one of {', '.join(FLAGS)}")
                flags |= FLAGS[fl]
            cleanup.append(Cleanup(r.regex(c["pattern"], f"{cw}.pattern", flags),
                                   r.string(c.get("replace", ""), f"{cw}.replace", empty_ok=True)))
        require = r.regex(d["require"], f"{where}.require") if d.get("require") is not None else None
        allow = d.get("allow_truncated", False)
        if not isinstance(allow, bool):
            raise r.error(f"{where}.allow_truncated", "true or false")
        out.append(Turn(name=name, role=role, prompt=prompt, stop=r.strings(d.get("stop"), f"{where}.stop"),
                        sampling=read_sampling(r, d.get("sampling") or {}, f"{where}.sampling", defaults),
                        require=require, cleanup=cleanup, allow_truncated=allow))
        defined.append(name)
    return out


def _check_template(r: Reader, text: str, where: str, defined: list[str]) -> None:
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise r.error(where, f"not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    for f, spec, conv in parsed:
        if spec or conv:
            raise r.error(where, f"{{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}: a template "
                          "variable takes no conversion or format spec (the text is put in as it is)")
    for f, _, _ in parsed:
        if not f.isidentifier():
            raise r.error(where, f"{{{f}}}: a template variable must be a plain name")
        if f not in defined:
            raise r.error(where, f"{{{f}}} is not defined (defined here: {', '.join(defined)})")
