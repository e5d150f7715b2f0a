"""The LLaVA JSON files of `tanuki synth captions`, assembled from its answer lines.

Two files, because the stages train different things: stage 1 aligns the projector on one caption
per image (the `plain` template keeps only the image and the caption), stage 2 teaches dialogue.
With ``seq_length`` (the training's data.seq_length) every record is built by our own SampleBuilder
first: a stage-2 conversation that does not fit becomes several records of the same image, an answer
too long on its own is left out and counted (training would skip such a record as bad, and stop
past data.max_bad_records).

Why a module of its own: the files are rebuilt from answers.jsonl alone (no model, no request) once
nothing is left to ask, and written whole (temp + rename), so they are never half-written or partial
and the same answers can be re-assembled for another seq_length.
"""
from __future__ import annotations

import collections
import json
import os

from megatron_tanuki.synth.captions_spec import ANSWERS, IMAGE_MARK, STAGE1, STAGE2, Image, Plan, answer_id, write_atomic


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
        write_atomic(os.path.join(p.out, name), json.dumps(data, ensure_ascii=False) + "\n")
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
