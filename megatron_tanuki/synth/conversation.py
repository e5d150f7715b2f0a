"""One conversation slot as a small state machine: which turn to ask next, what to do with the answer.

The scheduler owns many of these at once and asks each for its next request the moment the previous
answer arrives (no stage barrier). An answer that breaks its turn's rule -- empty, truncated by
max_tokens, missing the required pattern, emptied by a cleanup rule, a backend error -- is asked
again with a new derived seed, up to ``retries`` times; then the conversation is rejected with the
reason. Never silently dropped, never silently kept.

A teacher that *fails* (connection refused, HTTP errors after the backend's own retries, a wrong model
name) says nothing about the conversation: it is ABANDONed -- neither written nor rejected, so a rerun
does it -- and the scheduler decides whether the teacher is down. Only a request the engine refuses
outright (a prompt longer than the context) is rejected at once: it would fail the same way again.
"""
from __future__ import annotations

import time

from megatron_tanuki.synth.backend import TurnRequest, TurnResult
from megatron_tanuki.synth.recipe import Recipe, Turn, conversation_seed, render, turn_seed

DONE, NEXT, RETRY, REJECT, ABANDON = "done", "next", "retry", "reject", "abandon"


class Conversation:
    def __init__(self, recipe: Recipe, index: int):
        self.recipe, self.index = recipe, index
        self.id = recipe.conversation_id(index)
        self.seeds = recipe.variables(index)
        self.outputs: dict[str, str] = {}
        self.turn = 0
        self.attempt = 0
        self.finish_reasons: list[str] = []
        self.failures: list[str] = []      # reasons of the current turn's failed attempts
        self.reject_reason: str | None = None
        self.tokens = {"prompt": 0, "completion": 0}

    @property
    def current(self) -> Turn:
        return self.recipe.turns[self.turn]

    def request(self) -> TurnRequest:
        t = self.current
        variables = {**self.seeds, **self.outputs}
        messages = [{"role": "system", "content": self.recipe.teacher.system}] \
            if self.recipe.teacher.system is not None else []
        messages += [{"role": m["role"], "content": render(m["content"], variables)} for m in t.prompt]
        return TurnRequest(key=f"{self.id}:{t.name}:{self.attempt}", messages=messages,
                           temperature=float(t.sampling["temperature"]), top_p=float(t.sampling["top_p"]),
                           max_tokens=int(t.sampling["max_tokens"]),
                           stop=tuple(dict.fromkeys(self.recipe.teacher.stop + t.stop)),
                           seed=turn_seed(self.id, t.name, self.attempt))

    def accept(self, result: TurnResult) -> str:
        """Take the answer to :meth:`request`; DONE / NEXT (ask :meth:`request` again) / RETRY (same)
        / REJECT (``reject_reason`` says why) / ABANDON (the teacher failed: leave it for the rerun)."""
        self.tokens["prompt"] += result.prompt_tokens
        self.tokens["completion"] += result.completion_tokens
        text, why = self._check(self.current, result)
        if why is not None:
            self.failures.append(why)
            if result.finish_reason == "error" and result.error_kind != "request":
                self.reject_reason = why
                return ABANDON
            if self.attempt >= self.recipe.retries or result.finish_reason == "error":
                self.reject_reason = why
                return REJECT
            self.attempt += 1
            return RETRY
        self.outputs[self.current.name] = text
        self.finish_reasons.append(result.finish_reason)
        self.turn, self.attempt, self.failures = self.turn + 1, 0, []
        return DONE if self.turn == len(self.recipe.turns) else NEXT

    @staticmethod
    def _check(t: Turn, result: TurnResult) -> tuple[str, str | None]:
        if result.finish_reason == "error":
            return "", f"backend error ({result.error_kind or 'error'}): {result.error}"
        raw = result.text.strip()
        if not raw:
            return "", "empty answer"
        if result.finish_reason == "length" and not t.allow_truncated:
            return "", f"truncated at max_tokens {t.sampling['max_tokens']}"
        if t.require is not None and not t.require.search(raw):
            return "", f"does not match require {t.require.pattern!r}"
        text = raw
        for c in t.cleanup:
            text = c.pattern.sub(c.replace, text).strip()
        if not text:
            return "", "empty after cleanup"
        return text, None

    # -- records -------------------------------------------------------------------------------
    def record(self) -> dict:
        r = self.recipe
        messages = [{"role": t.role, "content": self.outputs[t.name]} for t in r.turns]
        rec = {"id": self.id, "index": self.index, "messages": messages}
        rec.update(self.seeds)
        rec.update(teacher=r.teacher.name, recipe={"name": r.name, "hash": r.hash},
                   sampling={t.name: {**t.sampling, "stop": list(dict.fromkeys(r.teacher.stop + t.stop))}
                             for t in r.turns},
                   seed=conversation_seed(self.id), finish_reasons=list(self.finish_reasons), created=_now())
        return rec

    def reject_record(self) -> dict:
        r = self.recipe
        return {"id": self.id, "index": self.index, "turn": self.current.name, "reason": self.reject_reason,
                "attempts": len(self.failures), "failures": list(self.failures),
                "messages": [{"role": t.role, "content": self.outputs[t.name]} for t in r.turns[:self.turn]],
                **self.seeds, "teacher": r.teacher.name, "recipe": {"name": r.name, "hash": r.hash},
                "created": _now()}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
