"""The two phases of `tanuki synth dpo` on one rank: the policy's answers, then the judge's verdicts.

Why a module of its own: both phases keep a backend at its capacity with one-shot requests, gather a
question's requests as they return in any order, and write the question's line only when all of them
are in -- so a killed run leaves whole lines, and a rerun skips what they hold. dpo.py decides which
phase runs where (engine ranks or one process with a server) and writes the summary.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from megatron_tanuki.synth.backend import TurnRequest, run_requests
from megatron_tanuki.synth.dpo_spec import (PERMANENT_ERRORS, REQUEST, DpoSpec, answer_seed, decide, iter_questions,
                                            judge_seed, parse_verdict, unjudgeable)


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
            if kind not in PERMANENT_ERRORS:
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
        if self.counts.get("failed") and self.rank0:
            print(f"[dpo] {self.name}: {self.counts['failed']} questions failed ({self.first_error}); "
                  "nothing was written for them: a rerun asks again", file=sys.stderr, flush=True)
        return out

    def completed(self, requests, pending: dict):
        """(question id, its entry of ``pending``, None) for every question whose requests (keys ending
        ``:<index>``) have all returned without error, in finishing order; (id, entry, message) when one
        could not be served (a PERMANENT_ERRORS kind: the caller rejects the question); a question with
        another failed request is counted "failed" and not yielded (a rerun asks again). The progress
        line ticks after each."""
        for res in run_requests(self.backend, requests):
            qid, _, k = res.key.rsplit(":", 2)
            entry = pending[qid]
            entry["results"][int(k)] = res
            self.result(res)
            if None in entry["results"]:
                continue
            del pending[qid]
            self.finished += 1
            errors = [r for r in entry["results"] if r.finish_reason == "error"]
            permanent = next((r for r in errors if r.error_kind in PERMANENT_ERRORS), None)
            if errors and permanent is None:
                self.add("failed")
                continue
            yield qid, entry, permanent and (permanent.error or "error").removeprefix(f"{permanent.key}: ")
            self.tick()


def answer_phase(spec: DpoSpec, task: PhaseTask, backend, rank0: bool, share) -> dict:
    """Phase 1: every question not yet answered gets ``spec.answers`` answers (distinct seeds), all
    submitted continuously; a question's record is written when its last answer arrives."""
    from megatron_tanuki.inference.generate import Writer

    path = os.path.join(task.out, "answers.jsonl")
    rejects_path = os.path.join(task.out, "rejects.jsonl")
    done = _done_ids([path, rejects_path], rank0, share)
    questions = list(iter_questions(spec, task.limit))
    skipped = sum(1 for qid, _ in questions if qid in done)
    ph = _Phase("policy answers", task, backend, rank0, len(questions), skipped)
    writer = Writer(path) if rank0 else None
    rejects = Writer(rejects_path) if rank0 else None
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
        for qid, entry, error in ph.completed(requests(), pending):
            results = entry["results"]
            if error is not None:
                ph.add(REQUEST)
                if rejects is not None:
                    rejects.write({"id": qid, "reason": REQUEST, "side": "policy", "error": error,
                                   "prompt": entry["prompt"], "policy": spec.policy.name})
                continue
            ph.add("answered")
            if writer is not None:
                writer.write({"id": qid, "prompt": entry["prompt"], "answers": [r.text.strip() for r in results],
                              "finish_reasons": [r.finish_reason for r in results],
                              "seeds": [answer_seed(qid, k) for k in range(spec.answers)],
                              "policy": spec.policy.name, "sampling": dict(s)})
    finally:
        for w in (writer, rejects):
            if w is not None:
                w.close()
    return ph.report()


def undecided_answers(spec: DpoSpec, out: str, limit, done: set):
    """The records of OUT/answers.jsonl the judge phase would take: wanted (the questions, at most
    ``limit``), not in ``done`` (decided), the first record of an id."""
    from megatron_tanuki.synth.store import iter_records

    path = os.path.join(out, "answers.jsonl")
    if not os.path.exists(path):
        return
    wanted = {qid for qid, _ in iter_questions(spec, limit)}
    seen: set[str] = set()
    for _, rec in iter_records(path):
        if rec["id"] in wanted and rec["id"] not in done and rec["id"] not in seen:
            seen.add(rec["id"])
            yield rec


def reject_unjudgeable(spec: DpoSpec, out: str, limit) -> dict:
    """Rank 0, before the judge is placed: write the rejects of answered questions the judge would not
    be asked about (empty, truncated, identical answers), so a judge is loaded only for real work.
    Returns the count per reason."""
    from megatron_tanuki.inference.generate import Writer

    rejects_path = os.path.join(out, "rejects.jsonl")
    done = _done_ids([os.path.join(out, "pairs.jsonl"), rejects_path], True, None)
    found = [(rec, reason) for rec in undecided_answers(spec, out, limit, done)
             if (reason := unjudgeable(rec, spec.allow_truncated)) is not None]
    counts: dict = {}
    if found:
        writer = Writer(rejects_path)
        try:
            for rec, reason in found:
                counts[reason] = counts.get(reason, 0) + 1
                writer.write(_reject_record(rec, reason))
        finally:
            writer.close()
    return counts


def _reject_record(rec: dict, reason: str, judged: dict | None = None, error: str | None = None) -> dict:
    return {"id": rec["id"], "reason": reason, **({"side": "judge", "error": error} if error is not None else {}),
            "prompt": rec["prompt"], "answers": rec["answers"], "finish_reasons": rec["finish_reasons"],
            "policy": rec.get("policy"), **({"judge": judged} if judged else {})}


def judge_phase(spec: DpoSpec, task: PhaseTask, backend, rank0: bool, share) -> dict:
    """Phase 2: every answered question not yet decided is judged twice, the answers in both orders
    (the two requests submitted together, temperature 0); the pair or the reject is written when both
    verdicts are in. Empty, truncated and identical answers are rejected without asking the judge
    (reject_unjudgeable does it before the judge loads; a question it missed is caught here)."""
    from megatron_tanuki.inference.generate import Writer

    pairs_path = os.path.join(task.out, "pairs.jsonl")
    rejects_path = os.path.join(task.out, "rejects.jsonl")
    done = _done_ids([pairs_path, rejects_path], rank0, share)
    wanted = {qid for qid, _ in iter_questions(spec, task.limit)}
    skipped = len(wanted & done)
    ph = _Phase("judge verdicts", task, backend, rank0, len(wanted), skipped)
    pairs = Writer(pairs_path) if rank0 else None
    rejects = Writer(rejects_path) if rank0 else None
    pending: dict[str, dict] = {}
    seen: set[str] = set()

    def reject(rec: dict, reason: str, judged: dict | None = None, error: str | None = None) -> None:
        ph.add(reason)
        if rejects is not None:
            rejects.write(_reject_record(rec, reason, judged, error))

    def judge_request(rec: dict, order: int) -> TurnRequest:
        a, b = rec["answers"] if order == 0 else rec["answers"][::-1]
        user = spec.judge_user.format(question=rec["prompt"], answer_a=a, answer_b=b)
        messages = [{"role": "user", "content": f"{spec.judge_system}\n\n{user}"}] if task.fold_system else \
            [{"role": "system", "content": spec.judge_system}, {"role": "user", "content": user}]
        return TurnRequest(key=f"{rec['id']}:judge:{order}", messages=messages, temperature=0.0, top_p=1.0,
                           max_tokens=spec.judge_max_tokens, seed=judge_seed(rec["id"], order))

    def requests():
        for rec in undecided_answers(spec, task.out, task.limit, done):
            seen.add(rec["id"])
            reason = unjudgeable(rec, spec.allow_truncated)
            if reason is not None:
                reject(rec, reason)
                ph.finished += 1
                continue
            pending[rec["id"]] = {"rec": rec, "results": [None, None]}
            yield judge_request(rec, 0)
            yield judge_request(rec, 1)

    if rank0:
        print(f"[dpo] judge verdicts ({spec.judge.name}): {len(wanted) - skipped} questions to decide, "
              f"{skipped} decided before", flush=True)
    try:
        for qid, entry, error in ph.completed(requests(), pending):
            results, rec = entry["results"], entry["rec"]
            if error is not None:
                reject(rec, REQUEST, error=error)
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
    finally:
        for w in (pairs, rejects):
            if w is not None:
                w.close()
    ph.add("unanswered", len(wanted - done - seen))
    return ph.report()
