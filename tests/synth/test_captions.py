"""`tanuki synth captions` on a tiny Tanuki-vision checkpoint (random LLaVA-JP weights converted by
our converter, fp32, the shipped tokenizer) and a folder of generated pictures.

What must hold: one LLaVA record per readable image holding the recipe's questions in order; every
answer equals `tanuki generate`'s greedy answer for the same image and prompt; both files load
through the training data reader (RecordIndex -> SampleBuilder -> RowStream, the templates
vlm_stage1/2 use) with the images found; a corrupt image is a reject naming the file; a rerun loads
no model and changes nothing; a run killed mid-write resumes with only the missing answers; an
answer cut by max_tokens is asked again, then rejected; a JSONL image list works; an unknown field
fails with the file and the field.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megatron_tanuki.synth.captions import run_captions
from megatron_tanuki.synth.captions_spec import ANSWERS, REJECTS, STAGE1, STAGE2

QUESTIONS = [("describe", "この画像を詳しく説明してください。", 6),
             ("count", "円はいくつありますか。", 3),
             ("color", "円は何色ですか。", 5)]
GOOD = ["a.png", "c.webp", "sub/b.jpg"]          # sorted by relative path
SMALL = {"kv_memory_gb": 0.05}


def recipe_text(images: str, ckpt: str, questions=QUESTIONS, extra: str = "allow_truncated: true") -> str:
    lines = ["name: tiny_captions", "captions:", f"  images: {images}", f"  model: {{name: tiny-vision, ckpt: {ckpt}}}",
             "  sampling: {temperature: 0}", "  retries: 1", f"  {extra}", "  questions:"]
    lines += [f"    - {{name: {n}, prompt: {p}, sampling: {{max_tokens: {m}}}{''.join(', ' + x for x in more)}}}"
              for n, p, m, *more in questions]
    return "\n".join(lines) + "\n"


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """``ck`` (tiny Tanuki-vision), ``imgs/`` (three pictures, one in a subfolder, a truncated PNG, a
    text file) and the recipe."""
    from PIL import Image, ImageDraw

    from megatron_tanuki.convert.engine import hf_to_mcore
    from tests.convert import tiny_llava

    d = tmp_path_factory.mktemp("captions")
    hf_to_mcore(tiny_llava.build(str(d), moe=False, dtype=torch.float32)["llava"], str(d / "ck"))
    (d / "imgs" / "sub").mkdir(parents=True)
    for name, colour in zip(GOOD, ((220, 30, 40), (40, 180, 70), (30, 60, 210))):
        im = Image.new("RGB", (64, 48), (240, 240, 240))
        ImageDraw.Draw(im).ellipse([8, 6, 44, 42], fill=colour)
        im.save(d / "imgs" / name)
    (d / "imgs" / "corrupt.png").write_bytes((d / "imgs" / "a.png").read_bytes()[:100])
    (d / "imgs" / "notes.txt").write_text("not an image")
    (d / "recipe.yaml").write_text(recipe_text(d / "imgs", d / "ck"), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def first(work):
    summary = run_captions(str(work / "recipe.yaml"), out=str(work / "out"), **SMALL)
    return summary


def test_llava_json_has_one_entry_per_image_with_the_recipe_questions(work, first):
    assert {k: first[k] for k in ("images", "target", "asked", "answered", "rejected", "left", "loaded_model")} == {
        "images": 4, "target": 12, "asked": 12, "answered": 9, "rejected": 3, "left": 0, "loaded_model": True}
    assert first["image_folder"] == str(work / "imgs")
    assert first["peak_in_flight"] == 12          # every (image, question) in flight at once
    answers = {(r["image"], r["question"]): r["answer"] for r in read_lines(work / "out" / ANSWERS)}
    stage2 = read_json(work / "out" / STAGE2)
    assert [r["id"] for r in stage2] == GOOD and [r["image"] for r in stage2] == GOOD
    for rec in stage2:
        humans = [f"<image>\n{QUESTIONS[0][1]}"] + [p for _, p, _ in QUESTIONS[1:]]
        assert rec["conversations"] == [turn for (name, _, _), h in zip(QUESTIONS, humans) for turn in (
            {"from": "human", "value": h}, {"from": "gpt", "value": answers[(rec["image"], name)]})]
        assert all(answers[(rec["image"], n)] for n, _, _ in QUESTIONS)
    stage1 = read_json(work / "out" / STAGE1)
    assert stage1 == [{"id": im, "image": im, "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTIONS[0][1]}"},
        {"from": "gpt", "value": answers[(im, "describe")]}]} for im in GOOD]


def test_answers_equal_tanuki_generate_greedy(work, first):
    from megatron_tanuki.inference.generate import GenerateJob, generate_rank

    requests = [{"id": f"{im}|{name}", "prompt": prompt, "image": f"imgs/{im}", "max_tokens": m, "temperature": 0}
                for im in GOOD for name, prompt, m in QUESTIONS]
    (work / "gen.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests),
                                    encoding="utf-8")
    generate_rank(GenerateJob(ckpt=str(work / "ck"), input=str(work / "gen.jsonl"), output=str(work / "gen_out.jsonl"),
                              progress=False, **SMALL))
    want = {r["id"]: (r["text"].strip(), r["finish_reason"]) for r in read_lines(work / "gen_out.jsonl")}
    got = {f"{r['image']}|{r['question']}": (r["answer"], r["finish_reason"])
           for r in read_lines(work / "out" / ANSWERS)}
    assert got == want and len(got) == 9
    assert all(text for text, _ in got.values())


def test_output_loads_through_the_training_data_reader(work, first):
    from megatron_tanuki.data.images import load_image
    from megatron_tanuki.data.records import BadRecords, RecordIndex
    from megatron_tanuki.data.samples import SampleBuilder
    from megatron_tanuki.data.stream import RowStream
    from megatron_tanuki.data.templates import IGNORE_INDEX, IMAGE_TOKEN_ID
    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.models.checkpoint_meta import read_meta, resolve

    cfg = read_meta(resolve(str(work / "ck"))).config
    tok = load_tokenizer()
    answers = {(r["image"], r["question"]): r["answer"] for r in read_lines(work / "out" / ANSWERS)}
    # the templates `tanuki train` picks for the modes (train/loop.py): plain for stage 1, v1 for stage 2
    for name, template, turns in ((STAGE1, "plain", ["describe"]), (STAGE2, "v1", [n for n, _, _ in QUESTIONS])):
        index = RecordIndex([str(work / "out" / name)])
        build = SampleBuilder("llava", template, tok, 256, first["image_folder"], cfg.num_image_tokens)
        assert len(index) == 3
        for i, im in enumerate(GOOD):
            s = build(index.read(i), index.where(i))
            assert s.images == [str(work / "imgs" / im)]
            load_image(s.images[0], s.where)
            assert s.inputs.count(IMAGE_TOKEN_ID) == cfg.num_image_tokens
            trained = [t for t in s.targets if t != IGNORE_INDEX]
            text = tok.decode(trained)
            assert [a in text for a in (answers[(im, n)] for n in turns)] == [True] * len(turns)
            if template == "v1":  # every answer closed by </s>
                assert trained.count(tok.eos_id) == len(turns)
        bad = BadRecords(limit=0, log=lambda *_: None)
        stream = RowStream(index, build, 256, seed=0, pretrain=False, pack=False, bad=bad)
        rows = stream.next_rows(len(index))          # one epoch: one sample a row without packing
        assert sorted(row.images[0] for row in rows) == [str(work / "imgs" / im) for im in GOOD]
        assert [len(row.images) for row in rows] == [1, 1, 1] and bad.total == 0


def test_corrupt_image_is_a_reject_naming_the_file(work, first):
    rejects = read_lines(work / "out" / REJECTS)
    path = work / "imgs" / "corrupt.png"
    assert sorted(r["question"] for r in rejects) == ["color", "count", "describe"]
    for r in rejects:
        assert (r["image"], r["path"], r["attempts"]) == ("corrupt.png", str(path), 1)  # not retried
        assert r["reason"] == f"cannot decode image {path}: image file is truncated"
    assert first["failure_reasons"] == {"request": 3}


def test_rerun_does_no_new_work_and_a_killed_run_resumes_with_the_rest(work, first):
    out = work / "out"
    before = {n: (out / n).read_bytes() for n in (ANSWERS, REJECTS, STAGE1, STAGE2)}
    again = run_captions(str(work / "recipe.yaml"), out=str(out), **SMALL)
    assert (again["asked"], again["skipped"], again["loaded_model"]) == (0, 12, False)
    assert {n: (out / n).read_bytes() for n in before} == before

    # killed mid-way: 4 answers written, the 5th torn, the LLaVA files not yet assembled
    cut = work / "cut"
    shutil.copytree(out, cut)
    lines = before[ANSWERS].splitlines(keepends=True)
    (cut / ANSWERS).write_bytes(b"".join(lines[:4]) + lines[4][:30])
    for n in (STAGE1, STAGE2):
        os.remove(cut / n)
    resumed = run_captions(str(work / "recipe.yaml"), out=str(cut), **SMALL)
    assert (resumed["skipped"], resumed["asked"], resumed["answered"]) == (7, 5, 5)
    got = read_lines(cut / ANSWERS)
    assert len({r["id"] for r in got}) == len(got) == 9
    assert {r["id"]: r["answer"] for r in got} == {r["id"]: r["answer"] for r in read_lines(out / ANSWERS)}
    assert read_json(cut / STAGE2) == read_json(out / STAGE2) and read_json(cut / STAGE1) == read_json(out / STAGE1)


def test_truncated_answer_is_asked_again_then_rejected_and_a_jsonl_image_list(work, tmp_path):
    """A JSONL image list (paths relative to it) with a question whose answers are cut by max_tokens
    (allow_truncated off): asked retries + 1 times with new seeds, then rejected with the reason."""
    (tmp_path / "list.jsonl").write_text(
        json.dumps({"id": "red", "image": os.path.relpath(work / "imgs" / "a.png", tmp_path)}) + "\n", encoding="utf-8")
    recipe = tmp_path / "strict.yaml"
    strict = ("short", "色は何ですか。", 1, "allow_truncated: false")
    recipe.write_text(recipe_text(tmp_path / "list.jsonl", work / "ck", [strict] + QUESTIONS[:1],
                                  extra="allow_truncated: true\n  stage1: describe"), encoding="utf-8")
    s = run_captions(str(recipe), out=str(tmp_path / "out"), **SMALL)
    assert {k: s[k] for k in ("answered", "rejected", "retried", "failure_reasons")} == {
        "answered": 1, "rejected": 1, "retried": 1, "failure_reasons": {"truncated": 2}}
    rejects = {r["question"]: r for r in read_lines(tmp_path / "out" / REJECTS)}
    assert rejects["short"]["image_id"] == "red" and rejects["short"]["attempts"] == 2
    assert rejects["short"]["failures"] == ["truncated at max_tokens 1"] * 2
    assert len(set(rejects["short"]["seeds"])) == 2          # each attempt with its own derived seed
    assert s["image_folder"] == str(tmp_path)
    stage1, stage2 = read_json(tmp_path / "out" / STAGE1), read_json(tmp_path / "out" / STAGE2)
    assert [r["id"] for r in stage1] == [r["id"] for r in stage2] == ["red"]
    assert stage2[0]["conversations"][0] == {"from": "human", "value": f"<image>\n{QUESTIONS[0][1]}"}
    assert len(stage2[0]["conversations"]) == 2          # the rejected question is left out
    assert os.path.samefile(os.path.join(s["image_folder"], stage2[0]["image"]), work / "imgs" / "a.png")


@pytest.mark.parametrize("old, new, field", [
    ("  retries: 1", "  retries: 1\n  colour: red", r"captions\.colour: unknown field"),
    ("{name: tiny-vision, ckpt:", "{name: tiny-vision, chekpoint:", r"captions\.model\.chekpoint: unknown field"),
    ("sampling: {max_tokens: 3}", "catgory: count", r"captions\.questions\[1\]\.catgory: unknown field"),
    ("  retries: 1", "  retries: 1\n  stage1: nope", r"captions\.stage1: 'nope'"),
    ("name: tiny_captions", "name: tiny_captions\nteachr: x", r"teachr: unknown field"),
])
def test_an_unknown_field_fails_naming_the_file_and_field(tmp_path, old, new, field):
    path = tmp_path / "bad.yaml"
    path.write_text(recipe_text(tmp_path, tmp_path / "ck").replace(old, new, 1), encoding="utf-8")
    with pytest.raises(ValueError, match=f"^{path}: {field}"):
        run_captions(str(path), out=str(tmp_path / "out"))


def test_the_shipped_recipe_loads():
    from megatron_tanuki.synth.captions_spec import load_captions

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = load_captions(os.path.join(root, "examples", "synth_captions_tanuki_vision.yaml"))
    assert (r.name, r.model, r.chat, r.stage1, r.retries) == ("captions_tanuki_vision", "tanuki-vision-8x8b",
                                                              "llava-v1", "describe", 3)
    assert [q.name for q in r.questions] == ["describe", "objects", "colors", "text", "spatial", "scene"]
    assert r.questions[0].prompt == "この画像を詳しく説明してください。"
    assert r.questions[0].sampling == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 768}
    assert r.questions[1].sampling == {"temperature": 0.2, "top_p": 0.9, "max_tokens": 384}
    assert len({q.hash for q in r.questions}) == 6


def test_two_expert_parallel_ranks_write_the_same_answers_once(work, tmp_path):
    """EP=2 (a tiny MoE Tanuki-vision, two spawned ranks stepping together, rank 0 writing): every
    answer once, equal to one rank's."""
    from megatron_tanuki.convert.engine import hf_to_mcore
    from tests.convert import tiny_llava

    hf_to_mcore(tiny_llava.build(str(tmp_path), moe=True, dtype=torch.float32)["llava"], str(tmp_path / "ck"))
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(recipe_text(work / "imgs", tmp_path / "ck", QUESTIONS[:2]), encoding="utf-8")
    runs = {ep: run_captions(str(recipe), out=str(tmp_path / f"ep{ep}"), ep=ep, **SMALL) for ep in (2, 1)}
    assert [(s["answered"], s["rejected"], s["left"]) for s in runs.values()] == [(6, 2, 0)] * 2
    answers = {ep: read_lines(tmp_path / f"ep{ep}" / ANSWERS) for ep in runs}
    assert len({r["id"] for r in answers[2]}) == len(answers[2]) == 6
    assert {r["id"]: r["answer"] for r in answers[2]} == {r["id"]: r["answer"] for r in answers[1]}
    assert read_json(tmp_path / "ep2" / STAGE2) == read_json(tmp_path / "ep1" / STAGE2)


def test_seq_length_splits_a_long_conversation_into_records_that_fit(work, first, tmp_path):
    """The same answers re-assembled (no model, no request) for a seq_length between the longest
    one-turn record and a whole conversation: each image's turns spread over records of that image,
    in order, every one built by the training reader within seq_length."""
    from megatron_tanuki.data.records import RecordIndex
    from megatron_tanuki.data.samples import SampleBuilder
    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.models.checkpoint_meta import read_meta, resolve

    positions = read_meta(resolve(str(work / "ck"))).config.num_image_tokens
    build = SampleBuilder("llava", "v1", load_tokenizer(), 10_000, first["image_folder"], positions)
    whole = read_json(work / "out" / STAGE2)
    one_turn = [dict(r, conversations=r["conversations"][2 * k:2 * k + 2]) for r in whole for k in range(3)]
    for r in one_turn:
        r["conversations"][0] = {"from": "human", "value": "<image>\n" + r["conversations"][0]["value"].split("\n")[-1]}
    seq = max(len(build(r, "r")) for r in one_turn) + 2
    assert seq < min(len(build(r, "r")) for r in whole)
    shutil.copytree(work / "out", tmp_path / "out")
    recipe = tmp_path / "split.yaml"
    recipe.write_text(recipe_text(work / "imgs", work / "ck") + f"  seq_length: {seq}\n", encoding="utf-8")
    s = run_captions(str(recipe), out=str(tmp_path / "out"), **SMALL)
    assert (s["asked"], s["loaded_model"], s["stage2_split_images"], s["stage2_over_long_turns"]) == (0, False, 3, 0)
    split = read_json(tmp_path / "out" / STAGE2)
    assert s["stage2_records"] == len(split) > 3 and s["stage2_turns"] == 9
    for im in whole:
        parts = [r for r in split if r["image"] == im["image"]]
        assert [r["id"] for r in parts] == [im["id"]] + [f"{im['id']}#{k}" for k in range(2, len(parts) + 1)]
        turns = [t for r in parts for t in r["conversations"]]
        assert [t["value"].split("\n")[-1] for t in turns] == [t["value"].split("\n")[-1] for t in im["conversations"]]
        assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in parts)
    fit = SampleBuilder("llava", "v1", load_tokenizer(), seq, first["image_folder"], positions)
    index = RecordIndex([str(tmp_path / "out" / STAGE2)])
    assert all(len(fit(index.read(i), index.where(i))) <= seq for i in range(len(index)))
    assert read_json(tmp_path / "out" / STAGE1) == read_json(work / "out" / STAGE1)


def test_another_checkpoint_asks_everything_again_and_records_it(work, first, tmp_path):
    """Without captions.model.name the checkpoint that loads makes the answers' ids: `--ckpt other`
    (a copy of the tiny model in another folder) asks again and records the other model; with the
    name set the user vouches for it, so the same answers stand. A --tokenizer changes the ids."""
    from megatron_tanuki.synth.captions import CaptionJob, plan

    other = tmp_path / "other"
    shutil.copytree(work / "ck", other)
    recipe = tmp_path / "unnamed.yaml"
    recipe.write_text(recipe_text(work / "imgs", work / "ck", QUESTIONS[:1]).replace("{name: tiny-vision, ckpt:",
                                                                                     "{ckpt:"), encoding="utf-8")
    out = tmp_path / "out"
    runs = [run_captions(str(recipe), out=str(out), limit=1, **SMALL),
            run_captions(str(recipe), out=str(out), limit=1, ckpt=str(other), **SMALL),
            run_captions(str(recipe), out=str(out), limit=1, ckpt=str(other), **SMALL)]
    assert [(s["asked"], s["skipped"], s["loaded_model"], s["model"]) for s in runs] == [
        (1, 0, True, "ck"), (1, 0, True, "other"), (0, 1, False, "other")]
    lines = read_lines(out / ANSWERS)
    assert [(r["model"], r["ckpt"], r["image"]) for r in lines] == [("ck", str(work / "ck"), "a.png"),
                                                                    ("other", str(other), "a.png")]
    assert lines[0]["id"] != lines[1]["id"] and lines[0]["answer"] == lines[1]["answer"]   # the same weights
    assert read_json(out / STAGE1)[0]["conversations"][1]["value"] == lines[1]["answer"]

    named = tmp_path / "named"
    shutil.copytree(work / "out", named)
    s = run_captions(str(work / "recipe.yaml"), out=str(named), ckpt=str(other), **SMALL)
    assert (s["asked"], s["skipped"], s["loaded_model"], s["model"]) == (0, 12, False, "tiny-vision")
    ids = {tok: [w[0] for w in plan(CaptionJob(str(work / "recipe.yaml"), out=str(named), tokenizer=tok)).work]
           for tok in (None, str(work / "ck" / "hf"))}
    assert set(ids[None]) == {r["id"] for r in read_lines(named / ANSWERS) + read_lines(named / REJECTS)}
    assert not set(ids[None]) & set(ids[str(work / "ck" / "hf")])


class StandInEngine:
    """The backend surface (submit/poll/capacity/in_flight/stats/close) answering by question name:
    an error of the given kind, or a fixed answer; it keeps every key it was asked."""

    def __init__(self, errors: dict[str, str]):
        self.errors, self.queue, self.asked = errors, [], []

    def submit(self, req):
        self.queue.append(req)
        self.asked.append(req.key)

    def poll(self, timeout: float):
        from megatron_tanuki.synth.backend import TurnResult

        done, self.queue = self.queue, []
        return [TurnResult(r.key, finish_reason="error", error=f"{r.key}: engine said no", error_kind=kind)
                if (kind := self.errors.get(r.key.split(":")[1])) else
                TurnResult(r.key, text=f"答え {r.key.split(':')[1]}", completion_tokens=2) for r in done]

    def capacity(self) -> int:
        return 8 - len(self.queue)

    def in_flight(self) -> int:
        return len(self.queue)

    def stats(self):
        from megatron_tanuki.synth.backend import BackendStats

        return BackendStats()

    def close(self) -> None:
        pass


def test_an_engine_error_is_left_for_the_rerun_and_only_a_refused_request_is_a_reject(work, tmp_path):
    """A connection error (not the answer's fault) is counted, written nowhere and not retried; the
    rerun asks it again. A request the engine refuses (kind "request") is a reject at once."""
    from megatron_tanuki.synth.captions import CaptionJob, answer_rest, plan
    from megatron_tanuki.synth.runner import StopFlag

    p = plan(CaptionJob(str(work / "recipe.yaml"), out=str(tmp_path / "out"), limit=1))
    failing = StandInEngine({"count": "connection", "color": "request"})
    s = answer_rest(p, failing, StopFlag(), progress=False)
    assert {k: s[k] for k in ("asked", "answered", "rejected", "retried", "failed", "left", "failure_reasons",
                              "stage1")} == {
        "asked": 2, "answered": 1, "rejected": 1, "retried": 0, "failed": 1, "left": 1,
        "failure_reasons": {"backend error (connection)": 1, "request": 1}, "stage1": None}
    assert sorted(k.split(":")[1:] for k in failing.asked) == [["color", "0"], ["count", "0"], ["describe", "0"]]
    assert [(r["question"], r["answer"]) for r in read_lines(tmp_path / "out" / ANSWERS)] == [("describe", "答え describe")]
    assert [(r["question"], r["reason"], r["attempts"]) for r in read_lines(tmp_path / "out" / REJECTS)] == [
        ("color", "engine said no", 1)]
    assert not (tmp_path / "out" / STAGE2).exists()

    working = StandInEngine({})
    s = answer_rest(plan(CaptionJob(str(work / "recipe.yaml"), out=str(tmp_path / "out"), limit=1)), working,
                    StopFlag(), progress=False)
    assert (s["skipped"], s["asked"], s["answered"], s["failed"], s["left"]) == (2, 1, 1, 0, 0)
    assert [k.split(":")[1] for k in working.asked] == ["count"]
    assert [t["value"] for t in read_json(tmp_path / "out" / STAGE2)[0]["conversations"][1::2]] == [
        "答え describe", "答え count"]
