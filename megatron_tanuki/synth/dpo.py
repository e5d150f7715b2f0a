"""`tanuki synth dpo RECIPE`: preference pairs from a policy's answers and a judge's verdicts.

Why this shape: a DPO pair is only worth training on when the judge's preference is real, and LLM
judges favour a position. So a policy model (Tanuki SFT) writes 2 answers per question (each with
its own derived seed), the judge (the teacher) compares them twice with the order swapped -- the
MT-Bench pairwise format, temperature 0 -- and only a consistent verdict (the same answer wins in
both orders) becomes ``{"id", "prompt", "chosen", "rejected", "judge"}``. Ties, inconsistent and
unparseable verdicts, identical, empty or truncated answers, and requests the policy or the judge
cannot serve (e.g. a prompt longer than its context) go to the rejects file with the reason, and are
counted in the summary: nothing is dropped or kept silently.

The questions: ``dpo.questions`` is an output folder of `tanuki synth run` -- the first user message of
every record, and only the rows `tanuki synth filter` kept (``OUT/filtered/data.jsonl``, ``keep: true``)
when the folder has been filtered, as `tanuki synth export` reads it (a filter that no longer covers
OUT/data is refused) -- or a JSONL file: synth records (lines with "messages") unless ``question_field``
names the question's field of plain lines (default "question").

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
fails for a passing reason (a server or engine error, a timeout: dpo_spec.PERMANENT_ERRORS says which
are not) writes nothing: it is counted and a rerun asks again; one the side refuses (the request itself
is bad) rejects its question for good. Answers the judge would not be asked about (identical, empty,
truncated) are rejected before the judge is placed, so a rerun with only those left loads no judge.

Where things are: dpo_spec.py reads and checks the dpo: section (the sides, the judge's prompt, seeds,
verdicts); dpo_phases.py runs one phase on one rank; this module places the phases (engine ranks or
this process), keeps the folder and writes the summary.
"""
from __future__ import annotations

import json
import os
import time

from megatron_tanuki.synth.dpo_phases import (PhaseTask, answer_phase, judge_phase, reject_unjudgeable,
                                              undecided_answers)
from megatron_tanuki.synth.dpo_spec import REASONS, DpoSpec, check_sides, iter_questions, load_dpo, unjudgeable


# ------------------------------------------------------------------------------ running

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
    fold = check_sides(spec)
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
            settled = reject_unjudgeable(spec, out, limit) if role == "judge" and rank0 else {}
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
            for reason, n in settled.items():
                phases[role][reason] = phases[role].get(reason, 0) + n
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
    """Whether the phase would ask anything (a rerun of a finished folder loads no model, nor does a
    judge phase left with answers it would reject unasked)."""
    from megatron_tanuki.synth.store import read_ids

    def ids(*names: str) -> set:
        paths = [os.path.join(out, name) for name in names]
        return set().union(*(read_ids(p) for p in paths if os.path.exists(p)))

    if role == "policy":
        wanted = {qid for qid, _ in iter_questions(spec, limit)}
        return bool(wanted - ids("answers.jsonl", "rejects.jsonl"))
    return any(unjudgeable(rec, spec.allow_truncated) is None
               for rec in undecided_answers(spec, out, limit, ids("pairs.jsonl", "rejects.jsonl")))


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
                                concurrency=side.concurrency, max_retries=side.max_retries)
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
