"""A fake OpenAI-compatible chat server on 127.0.0.1, for the synth tests and `tools/bench_synth.py`.

Why: the HTTP backend and the conversation scheduler must be tested against what a real teacher
server does under load -- latency that varies per request, 429 with Retry-After, 5xx, dropped
connections, a broken body -- reproducibly, bounded, and without a model. The answer to a chat
request is a pure function of its messages and seed (:func:`answer_for`), so a test knows which
request got which answer.

Usage::

    with FakeServer(latency=0.02, faults={0: "429", 5: "drop"}, retry_after=1) as srv:
        backend = OpenAIBackend([srv.url])          # srv.url == "http://127.0.0.1:PORT/v1"
        ...
        assert srv.sent_429 == 1 and srv.drops == 1 and srv.max_concurrency <= 32

Knobs (all keyword arguments):
  latency       seconds before an answer: a number, or ``fn(n, body) -> seconds``; ``n`` is the
                0-based index of the chat request among all this server has seen (retries included),
                ``body`` its JSON. Applies to answered requests (and "garbage"), not to faults.
                Capped at ``max_latency_s``; cut short when the server stops.
  faults        which chat requests fail, and how: None, ``{n: kind}``, or ``fn(n, body) -> kind | None``.
                Kinds: "429" (with Retry-After), "500", "503", "400" (not retryable), "drop" (the
                socket is closed without an answer), "garbage" (200 with a truncated JSON body).
  retry_after   the Retry-After header of a 429/503: seconds (number), a string sent verbatim (e.g.
                an HTTP date), None for no header, or ``fn(n) -> one of those``.
  model         the id /v1/models lists; a chat request naming another model gets 404.
  api_key       when set, a request without ``Authorization: Bearer <api_key>`` gets 401.
  completion_tokens  usage.completion_tokens of an answer (at most the request's max_tokens): a number,
                or ``fn(n, body) -> int`` (e.g. to change latency per output token at a fixed latency).

Read back: ``requests`` (chat requests seen), ``ok`` (answered 200 with a good body), ``sent``
(Counter of faults sent, by kind, plus "401"/"404"), ``sent_429``, ``sent_500``, ``drops``,
``model_requests`` (GET /v1/models), ``max_concurrency`` (most chat requests in the handler at once),
``log`` (a :class:`Hit` per chat request, in arrival order).
"""
import asyncio
import hashlib
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

FAULT_KINDS = ("429", "500", "503", "400", "drop", "garbage")


def request_digest(messages, seed) -> str:
    """16 hex chars that identify a chat request by its messages and seed."""
    blob = json.dumps([messages, seed], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def answer_for(messages, seed) -> str:
    """The fake's answer to a chat request: a pure function of its messages and seed."""
    return f"答え {request_digest(messages, seed)}"


def prompt_tokens_for(messages) -> int:
    """usage.prompt_tokens of the fake: the characters of all message texts, and 1 per image part."""
    def size(content) -> int:
        if isinstance(content, list):
            return sum(len(p.get("text", "")) if p.get("type") == "text" else 1 for p in content)
        return len(content or "")

    return sum(size(m.get("content")) for m in messages)


def lognormal_latency(mean_s: float, sigma: float = 0.6):
    """A ``latency`` knob: seconds drawn from a lognormal with mean ``mean_s`` (spread ``sigma``), seeded
    by the request (messages + seed), as the answers of a loaded teacher server vary with their length
    and batch. Deterministic: the same request always waits the same time."""
    import math
    import random

    mu = math.log(mean_s) - sigma ** 2 / 2

    def latency(n, body) -> float:
        rng = random.Random(request_digest(body.get("messages"), body.get("seed")))
        return rng.lognormvariate(mu, sigma)

    return latency


@dataclass
class Hit:
    """One chat request as the server saw it."""
    n: int                 # index among all chat requests this server has seen
    t: float               # time.monotonic() on arrival (same clock as the test's)
    digest: str            # request_digest(messages, seed)
    fault: str | None      # the fault injected ("401"/"404" when refused), None when answered
    auth: str | None       # the Authorization header
    model: str | None      # the model the request named


class FakeServer:
    def __init__(self, *, latency=0.0, faults=None, retry_after=1, model: str = "fake-teacher",
                 api_key: str | None = None, completion_tokens: int = 8, max_latency_s: float = 30.0, answer=None):
        self.answer = answer      # None: answer_for(messages, seed); else fn(n, messages, seed, body) -> text | (text, finish)
        self.bodies: list[dict] = []
        self.latency, self.faults, self.retry_after = latency, faults, retry_after
        self.model, self.api_key, self.completion_tokens = model, api_key, completion_tokens
        self.max_latency_s = max_latency_s
        self.requests = self.ok = self.model_requests = 0
        self.sent: Counter = Counter()
        self.max_concurrency = 0
        self.log: list[Hit] = []
        self._active = 0
        self._stopping = False
        self.url = ""

    # ---- counters ----

    @property
    def sent_429(self) -> int:
        return self.sent["429"]

    @property
    def sent_500(self) -> int:
        return self.sent["500"]

    @property
    def drops(self) -> int:
        return self.sent["drop"]

    def hits(self, digest: str) -> list[Hit]:
        """Every arrival of one request (its first attempt and its retries), in order."""
        return [h for h in self.log if h.digest == digest]

    # ---- lifecycle ----

    def __enter__(self) -> "FakeServer":
        import uvicorn

        self._app = self._build_app()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        # keep-alive far above the client's, so no request meets a connection the server is closing
        config = uvicorn.Config(self._asgi, log_level="warning", lifespan="off", http="h11", interface="asgi3",
                                access_log=False, timeout_keep_alive=300, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("FakeServer: uvicorn did not start within 20 s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._stopping = True
        self._server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    # ---- the app ----

    async def _asgi(self, scope, receive, send):
        if scope["type"] == "http":  # uvicorn's receive is a method of the request cycle, which owns the socket
            scope["fake_openai.cycle"] = getattr(receive, "__self__", None)
        await self._app(scope, receive, send)

    def _build_app(self):
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, Response

        app = FastAPI()

        def error(status: int, message: str, headers=None):
            return JSONResponse({"error": {"message": message, "type": "fake", "code": status}}, status, headers)

        def authorized(request: Request) -> bool:
            return not self.api_key or request.headers.get("authorization") == f"Bearer {self.api_key}"

        @app.get("/v1/models")
        async def models(request: Request):
            self.model_requests += 1
            if not authorized(request):
                self.sent["401"] += 1
                return error(401, "fake: missing or wrong API key")
            return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            n, t = self.requests, time.monotonic()
            self.requests += 1
            self._active += 1
            self.max_concurrency = max(self.max_concurrency, self._active)
            try:
                body = await request.json()
                messages, seed = body.get("messages") or [], body.get("seed")
                refusal = None
                if not authorized(request):
                    refusal = ("401", "fake: missing or wrong API key")
                elif body.get("model") != self.model:
                    refusal = ("404", f"fake: the model `{body.get('model')}` does not exist")
                fault = None if refusal else self._fault(n, body)
                self.log.append(Hit(n, t, request_digest(messages, seed), fault or (refusal and refusal[0]),
                                    request.headers.get("authorization"), body.get("model")))
                if refusal:
                    self.sent[refusal[0]] += 1
                    return error(int(refusal[0]), refusal[1])
                if fault is not None:
                    self.sent[fault] += 1
                if fault == "drop":
                    await self._drop(request)
                    return Response(status_code=204)  # never sent: the connection is gone
                if fault in ("429", "503"):
                    value = self.retry_after(n) if callable(self.retry_after) else self.retry_after
                    headers = {} if value is None else {"Retry-After": str(value)}
                    return error(int(fault), f"fake: injected {fault}", headers)
                if fault == "500":
                    return error(500, "fake: injected internal error")
                if fault == "400":
                    return error(400, "fake: injected bad request")
                await self._sleep(self.latency(n, body) if callable(self.latency) else self.latency)
                if fault == "garbage":
                    return Response('{"id": "cmpl-fake", "choices": [{"mess', media_type="application/json")
                self.ok += 1
                return self._completion(n, messages, seed, body)
            finally:
                self._active -= 1

        return app

    def _fault(self, n: int, body: dict) -> str | None:
        if self.faults is None:
            return None
        fault = self.faults(n, body) if callable(self.faults) else self.faults.get(n)
        if fault is not None and fault not in FAULT_KINDS:
            raise ValueError(f"FakeServer: unknown fault {fault!r} (one of {', '.join(FAULT_KINDS)})")
        return fault

    def _completion(self, n: int, messages, seed, body) -> dict:
        tokens = self.completion_tokens(n, body) if callable(self.completion_tokens) else self.completion_tokens
        tokens = min(tokens, int(body.get("max_tokens") or tokens))
        prompt = prompt_tokens_for(messages)
        self.bodies.append(body)
        text, finish = answer_for(messages, seed), "stop"
        if self.answer is not None:
            got = self.answer(n, messages, seed, body)
            text, finish = got if isinstance(got, tuple) else (got, "stop")
        return {"id": f"chatcmpl-{request_digest(messages, seed)}", "object": "chat.completion",
                "created": int(time.time()), "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}}

    async def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + min(max(seconds, 0.0), self.max_latency_s)
        while not self._stopping and (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.05))

    async def _drop(self, request) -> None:
        """Close the client's socket without an answer, and let uvicorn notice before the handler returns."""
        cycle = request.scope.get("fake_openai.cycle")
        transport = getattr(cycle, "transport", None)
        if transport is None:
            raise RuntimeError("FakeServer: this uvicorn does not expose the connection; cannot drop it")
        transport.abort()
        for _ in range(200):
            if cycle.disconnected:
                return
            await asyncio.sleep(0.001)
