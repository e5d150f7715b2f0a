"""What the conversation scheduler asks of a teacher backend, whichever it is.

A backend takes :class:`TurnRequest` s (chat messages + sampling + a seed) and hands back
:class:`TurnResult` s as they finish, in any order. Two exist: the in-process engine
(``engine_backend.EngineBackend``: every rank of a TP/PP/EP layout steps together) and
OpenAI-compatible HTTP (``http_backend.OpenAIBackend``: one or more base URLs). The scheduler
(``runner.py``) only uses this surface, so both run the same continuous per-conversation schedule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TurnRequest:
    key: str                          # unique per attempt: "<conversation id>:<turn name>:<attempt>"
    messages: list[dict]              # [{"role": "system"|"user"|"assistant", "content": str}, ...]
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int = 0                     # derived from the conversation id, the turn and the attempt
    images: tuple[str, ...] = ()      # image files for a vision model (captions); "<image>" marks their place

    def sampling(self) -> dict:
        d = asdict(self)
        return {k: d[k] for k in ("temperature", "top_p", "max_tokens")} | {"stop": list(self.stop)}


@dataclass
class TurnResult:
    key: str
    text: str = ""
    finish_reason: str = "stop"       # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None          # set when finish_reason == "error": what went wrong, one line
    error_kind: str | None = None     # "http_429", "http_500", "connection", "timeout", "request", ...
    latency_s: float = 0.0
    retries: int = 0                  # attempts the backend itself repeated (HTTP retries)


@dataclass
class BackendStats:
    """Counters a backend keeps for the progress line and the summary."""
    retries: dict = field(default_factory=dict)      # kind -> count of retried attempts
    errors: dict = field(default_factory=dict)       # kind -> requests given up on
    concurrency: int = 0                             # requests it accepts in flight now


def run_requests(backend, requests, poll_s: float = 0.2):
    """Yield a TurnResult for every TurnRequest of ``requests`` (an iterable, read lazily), keeping the
    backend at its capacity: for one-shot work (DPO answers and verdicts, captions) that needs no
    conversation state. Results come in finishing order."""
    it = iter(requests)
    pending, exhausted = 0, False
    while True:
        while not exhausted and backend.capacity() > 0:
            req = next(it, None)
            if req is None:
                exhausted = True
                break
            backend.submit(req)
            pending += 1
        if pending == 0 and exhausted:
            return
        for res in backend.poll(poll_s):
            pending -= 1
            yield res
