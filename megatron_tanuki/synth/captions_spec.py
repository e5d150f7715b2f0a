"""What `tanuki synth captions` asks about which images, and where the answers go: the ``captions:``
section of a recipe, the image list, and the output folder's files.

Why a module of its own: all of it is decided before a model loads, so a mistake in the recipe or
the image list is reported naming the file and ``captions.<field>`` (or the JSONL line) while nothing
is running; captions.py asks and llava.py assembles the training files from the same Plan.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from megatron_tanuki.synth.recipe import Reader, load_section, read_sampling

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
    hash: str = ""                # what decides the answer's text: prompt, sampling, stop, chat, model (identify)


@dataclass
class CaptionRecipe:
    name: str
    path: str
    text: str
    images: str | None            # the recipe's image source (relative to the working directory)
    out: str | None
    model: str                    # recorded with every answer; part of each question's hash
    ckpt: str | None
    model_name: str | None        # captions.model.name as written (None: named after the checkpoint)
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
    model_name = r.string(model["name"], "captions.model.name") if model.get("name") is not None else None
    defaults = read_sampling(r, c.get("sampling") or {}, "captions.sampling", DEFAULT_SAMPLING)
    stop = r.strings(c.get("stop"), "captions.stop")
    allow = _flag(r, c.get("allow_truncated", False), "captions.allow_truncated")
    retries = c.get("retries", 3)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise r.error("captions.retries", f"{retries!r}: an integer >= 0")
    questions = _questions(r, c["questions"], defaults, stop, allow)
    stage1 = c.get("stage1", questions[0].name)
    if stage1 not in [q.name for q in questions]:
        raise r.error("captions.stage1", f"{stage1!r}: the name of one of captions.questions")
    images = r.string(c["images"], "captions.images") if c.get("images") is not None else None
    out = r.string(c["out"], "captions.out") if c.get("out") is not None else None
    seq = c.get("seq_length")
    if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or seq < 2):
        raise r.error("captions.seq_length", f"{seq!r}: the training's data.seq_length, an integer")
    captions = CaptionRecipe(name=name, path=os.path.abspath(path), text=recipe.text, images=images, out=out,
                             model="", ckpt=ckpt, model_name=model_name, chat=chat, questions=questions,
                             retries=retries, stage1=stage1, seq_length=seq)
    identify(captions, ckpt)
    return captions


def identify(recipe: CaptionRecipe, ckpt: str | None, loaded: str | None = None, tokenizer: str | None = None) -> None:
    """Set ``recipe.model`` (the name recorded with every answer) and each question's hash for the
    model that answers: ``ckpt`` as given (``--ckpt`` or captions.model.ckpt), ``loaded`` the folder it
    resolves to, ``tokenizer`` a ``--tokenizer`` override.

    Why the loaded checkpoint and not the recipe's text: the hash makes each answer's id, and a rerun
    skips the ids it finds, so `--ckpt other` must not find the first model's answers done (and
    record them under its name). With captions.model.name set, that name alone stands for the
    weights -- the user vouches for it, so a checkpoint copied to node-local disk (another path, the
    same weights) keeps its answers; without it the resolved path does (a run folder whose latest
    iteration moved on is another model). A tokenizer override changes the prompt's tokens, so it
    counts either way."""
    recipe.ckpt = ckpt
    recipe.model = recipe.model_name or (os.path.basename(os.path.normpath(ckpt)) if ckpt else "vlm")
    who = {"model": recipe.model}
    if recipe.model_name is None and (loaded or ckpt):
        who["ckpt"] = os.path.abspath(loaded or ckpt)
    if tokenizer is not None:
        who["tokenizer"] = os.path.abspath(tokenizer) if os.path.exists(tokenizer) else tokenizer
    for q in recipe.questions:
        identity = {"prompt": q.prompt, "sampling": q.sampling, "stop": q.stop, "chat": recipe.chat, **who}
        q.hash = _digest(json.dumps(identity, sort_keys=True, ensure_ascii=False))


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


# -------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """One run's work, built by captions.plan(): the recipe, the output folder, the checkpoint, the
    images and every (answer id, image, question) to have answered."""
    recipe: CaptionRecipe
    out: str
    ckpt: str
    folder: str
    images: list[Image]
    tokenizer: str | None = None
    work: list[tuple[str, Image, Question]] = field(default_factory=list)   # (answer id, image, question)


# -------------------------------------------------------------------------- the output folder

def write_atomic(path: str, text: str) -> None:
    """``text`` as the whole of ``path`` (temp + fsync + rename): never a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
