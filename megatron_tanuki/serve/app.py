"""The HTTP side of `tanuki serve`: an OpenAI-compatible FastAPI app over the engine loop.

``create_app(loop, tok, cfg, opts)`` serves ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health`` and ``GET /metrics``. One HTTP request
becomes ``n`` engine jobs (``loop.submit``); their events arrive on the engine loop's thread and hop
to this event loop with ``call_soon_threadsafe``.

Prompts:
* chat: the messages rendered with the chat template (``--chat``; default ``tanuki``, ``llava-v1`` for
  Tanuki-vision) by ``data.templates.prompt_ids`` -- the ids `tanuki generate` builds for the same
  messages, so greedy text matches it. A content list joins its parts with "\\n"; each ``image_url``
  part becomes an ``<image>`` marker where the part stands (the llava-v1 template moves the first
  turn's image to its front, as in training). ``developer`` is read as ``system``; where the template
  has no system turn (llava-v1) a system message is a 400.
* completions: the prompt is raw text, BOS + the text tokenized once (the ``none`` template's
  semantics, ``templates.encode_text(..., images=False)``): a completions client sends its own
  format, and "<image>" there is plain text. A list of token ids is taken as is (no BOS added).

Sampling: OpenAI's defaults (temperature 1, top_p 1); ``top_k`` is an extension (-1 or 0: off).
Choice ``i`` is engine key ``choice-{i}`` with ``SamplingOptions.seed`` = the request's ``seed``, so
a seeded request gives the same tokens on every call and at any concurrency (the engine's sampling
noise is a function of seed, key and position only); without a seed each request draws a fresh
random one. Greedy output depends on neither.

Errors are OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}``:
400 invalid_request_error (malformed JSON, wrong types, prompt or max_tokens over a limit, images
that do not decode, engine refusals) -- 401 invalid_request_error/invalid_api_key -- 404
invalid_request_error/model_not_found -- 413 invalid_request_error/request_too_large -- 429
rate_limit_error/rate_limit_exceeded (with Retry-After) -- 503 server_error/shutting_down.

Streams open only once every choice has its first token (or its error): an engine refusal is still
a plain 400, not a broken stream. A client that goes away -- mid-stream, or while a non-streamed
answer is being computed -- has its jobs cancelled (``loop.cancel``), which frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import os
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from megatron_tanuki.data import templates
from megatron_tanuki.inference.engine import SamplingOptions
from megatron_tanuki.models import registry
from megatron_tanuki.serve import protocol as P
from megatron_tanuki.serve.loop import Job
from megatron_tanuki.serve.metrics import ServerMetrics

CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
ENDPOINTS = (CHAT, COMPLETIONS, MODELS, "/health", "/metrics")
MAX_N = 64
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An answer in OpenAI's error shape (raised anywhere in a handler)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = P.ErrorResponse(error=P.ErrorDetail(message=self.message, type=self.type, param=self.param,
                                                   code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


class _ClientGone(Exception):
    pass


# ----------------------------------------------------------------------------- the API key gate

class _Gate:
    """Outermost ASGI layer: the API key (every path but /health) and the request counter by endpoint
    and status -- here so that 401s, 404s and 500s are counted like the rest."""

    def __init__(self, app, server: "_Server"):
        self.app, self.server = app, server
        self.key = server.opts.api_key.encode() if server.opts.api_key else None

    def _key_error(self, scope) -> ApiError | None:
        if self.key is None or scope["path"] == "/health":
            return None
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if header is None:
            return ApiError(401, "Missing API key: send the header 'Authorization: Bearer KEY'.",
                            code="invalid_api_key")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [None]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope["path"]
        label = path if path in ENDPOINTS else "/v1/models/{model}" if path.startswith(MODELS + "/") else "other"
        try:
            denied = self._key_error(scope)
            if denied is not None:
                await denied.response()(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            self.server.metrics.requests.inc(endpoint=label, status=str(status[0] or 500))


# ----------------------------------------------------------------------------- one HTTP call's jobs

class _Call:
    """The engine jobs of one HTTP request; their events in one asyncio queue as (choice, Event)."""

    def __init__(self, server: "_Server", jobs, t0: float):
        self.server, self.t0, self.n = server, t0, len(jobs)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = [False] * self.n
        self.last = [None] * self.n          # when each streamed choice's last tokens came
        aio = asyncio.get_running_loop()
        for i, job in enumerate(jobs):
            job.sink = self._sink(aio, i)
        self.handles = [server.loop.submit(job) for job in jobs]

    def _sink(self, aio, i):
        queue = self.queue

        def sink(event):  # on the engine loop's thread
            try:
                aio.call_soon_threadsafe(queue.put_nowait, (i, event))
            except RuntimeError:  # this event loop is closed: the server is gone
                pass
        return sink

    @property
    def finished(self) -> bool:
        return all(self.done)

    def cancel(self) -> None:
        """Cancel the jobs that have not finished (idempotent)."""
        for i, handle in enumerate(self.handles):
            if not self.done[i]:
                self.done[i] = True
                self.server.loop.cancel(handle)

    async def next(self):
        i, event = await self.queue.get()
        if event.kind in ("done", "error"):
            self.done[i] = True
        if event.tokens:
            now, m = time.perf_counter(), self.server.metrics
            if self.last[i] is None:
                if event.kind == "delta":
                    m.ttft.observe(now - self.t0)
            else:
                m.itl.observe((now - self.last[i]) / len(event.tokens), times=len(event.tokens))
            self.last[i] = now
        return i, event

    def refused(self, event) -> ApiError:
        """An engine "error" event as the answer: 400 with its message (a request the engine cannot
        serve), or 503 once the server is shutting down (jobs cut off at the end of the grace time)."""
        self.cancel()
        if self.server.loop.stopping.is_set():
            return ApiError(503, event.error or "the server is shutting down", type="server_error",
                            code="shutting_down")
        return ApiError(400, event.error or "the engine refused the request")

    async def first_events(self) -> list:
        """Events until every choice has one (a stream opens then); an error -> 400."""
        pending, seen = [], set()
        while len(seen) < self.n:
            i, event = await self.next()
            if event.kind == "error":
                raise self.refused(event)
            pending.append((i, event))
            seen.add(i)
        return pending

    async def results(self) -> list:
        """Each choice's final event (non-streamed jobs send only that one)."""
        out = [None] * self.n
        while not self.finished:
            i, event = await self.next()
            if event.kind == "error":
                raise self.refused(event)
            if event.kind == "done":
                out[i] = event
        return out


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_gone(request: Request, coro, call: _Call):
    """``await coro``, unless the client disconnects first: then cancel the call's jobs."""
    work = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler is itself cancelled
        gone.cancel()
        if not work.done():
            work.cancel()
            call.cancel()
    if work not in done:
        raise _ClientGone
    return work.result()


class _EventStream(StreamingResponse):
    """A StreamingResponse that always runs ``on_close`` -- after the last event, or when Starlette
    stops the stream because the client disconnected (the body generator may never resume then)."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# ----------------------------------------------------------------------------- logprobs

def token_texts(tok, tokens: list[int], start: int = 0) -> list[str]:
    """Each token's text from ``start`` on, as the growing text shows it (SentencePiece drops a
    word's leading space when a token is decoded alone; decoding with a few tokens of context keeps
    it), so the pieces join to the completion's text."""
    out = []
    for i in range(start, len(tokens)):
        lo = max(0, i - 6)
        before, after = tok.decode(tokens[lo:i]), tok.decode(tokens[lo:i + 1])
        out.append(after[len(before):] if after.startswith(before) else tok.decode(tokens[i:i + 1]))
    return out


def _top(d: dict | None, k: int) -> list[tuple[str, float]]:
    return sorted((d or {}).items(), key=lambda kv: -kv[1])[:k]


class _Choice:
    """One choice's tokens so far, to turn events into OpenAI logprobs entries."""

    def __init__(self):
        self.tokens: list[int] = []
        self.offset = 0                      # characters of the token texts so far (text_offset)

    def entries(self, tok, event, want: bool) -> list[tuple[str, float, dict | None]]:
        start = len(self.tokens)
        self.tokens += event.tokens
        if not want:
            return []
        texts = token_texts(tok, self.tokens, start)
        lps = event.logprobs or []
        tops = list(event.top_logprobs or [])  # stream deltas carry none (the loop sends log-probs only)
        return list(zip(texts, lps, tops + [None] * (len(lps) - len(tops))))

    def logprobs(self, entries, k: int, chat: bool):
        return self.chat_logprobs(entries, k) if chat else self.completion_logprobs(entries, k)

    def chat_logprobs(self, entries, k: int) -> P.ChoiceLogprobs:
        return P.ChoiceLogprobs(content=[
            P.TokenLogprob(token=t, logprob=lp, bytes=list(t.encode()),
                           top_logprobs=[P.TopLogprob(token=a, logprob=b, bytes=list(a.encode()))
                                         for a, b in _top(top, k)])
            for t, lp, top in entries])

    def completion_logprobs(self, entries, k: int) -> P.CompletionLogprobs:
        offsets = []
        for t, _, _ in entries:
            offsets.append(self.offset)
            self.offset += len(t)
        return P.CompletionLogprobs(
            tokens=[t for t, _, _ in entries], token_logprobs=[lp for _, lp, _ in entries],
            top_logprobs=[dict(_top(top, k)) if k else {t: lp} for t, lp, top in entries], text_offset=offsets)


# ----------------------------------------------------------------------------- requests -> jobs

@dataclasses.dataclass
class _Plan:
    """A validated request: what to submit and how to answer."""

    kind: str                     # "chat" | "completion"
    ids: list[int]
    images: list
    prompt_tokens: int
    sampling: SamplingOptions
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


class _Server:
    def __init__(self, loop, tok, cfg, opts):
        self.loop, self.tok, self.cfg, self.opts = loop, tok, cfg, opts
        self.model = opts.served_model_name or getattr(cfg, "name", None) or "tanuki"
        self.vision = hasattr(cfg, "vision")
        self.template = templates.get(opts.chat or registry.architecture_of(cfg).default_chat)
        self.image_tokens = int(getattr(cfg, "num_image_tokens", 1)) if self.vision else 1
        self.context = int(opts.max_seq_len or loop.engine.options.max_sequence_length)
        self.max_prompt = min(opts.max_prompt_tokens or self.context - 1, self.context - 1)
        self.max_tokens = opts.max_tokens_limit or self.context
        self.image_root = os.path.realpath(opts.allow_local_images) if opts.allow_local_images else None
        self.created = int(time.time())
        self.active = 0
        self.metrics = ServerMetrics(loop.stats, lambda: self.active)

    # -- body and fields ---------------------------------------------------------------------
    async def body(self, request: Request) -> bytes:
        limit = self.opts.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes",
                           code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(self, body: bytes, kind: str):
        model = P.ChatRequest if kind == "chat" else P.CompletionRequest
        try:
            req = model.model_validate_json(body)
        except ValidationError as e:
            message, param = P.validation_message(e)
            raise ApiError(400, message, param=param) from None
        if req.model is not None and req.model != self.model:
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves `{self.model}`.",
                           param="model", code="model_not_found")
        return req

    # -- prompts -----------------------------------------------------------------------------
    def image_source(self, url: str, where: str):
        """``data:`` URL -> bytes; a path (or file:// URL) inside --allow-local-images -> its path."""
        if url.startswith("data:"):
            head, comma, data = url.partition(",")
            if not comma or not head.endswith(";base64"):
                raise ApiError(400, f"{where}: a data: URL must carry base64 data (data:image/png;base64,...)",
                               param=where)
            try:
                return base64.b64decode("".join(data.split()), validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, f"{where}: the data: URL is not valid base64", param=where) from None
        if url.startswith(("http://", "https://")):
            raise ApiError(400, f"{where}: image URLs are not fetched; send the image as a data: URL (base64)",
                           param=where)
        if self.image_root is None:
            raise ApiError(400, f"{where}: image_url must be a data: URL (base64); local files need the server "
                           "started with --allow-local-images DIR", param=where)
        path = url[len("file://"):] if url.startswith("file://") else url
        if "\0" in path:
            raise ApiError(400, f"{where}: a file path with a NUL character", param=where)
        real = os.path.realpath(os.path.join(self.image_root, path))
        if os.path.commonpath([real, self.image_root]) != self.image_root:
            raise ApiError(400, f"{where}: {url} is outside the folder allowed by --allow-local-images", param=where)
        return real

    def load_images(self, sources) -> list:
        """Decode and preprocess (a worker thread runs this): a bad image is a 400 naming its part."""
        from megatron_tanuki.data.images import ImageError, load_image, preprocess

        out = []
        for where, source in sources:
            try:
                out.append(preprocess(load_image(source, where), self.cfg.image_size))
            except ImageError as e:
                raise ApiError(400, str(e), param=where) from None
            except Exception as e:  # PIL's DecompressionBombError and friends
                raise ApiError(400, f"{where}: cannot decode image: {e}", param=where) from None
        return out

    def chat_turns(self, messages) -> tuple[list, list]:
        """(turns, image sources) from OpenAI messages."""
        if not messages:
            raise ApiError(400, "messages: at least one message is required", param="messages")
        turns, sources = [], []
        for i, m in enumerate(messages):
            role = "system" if m.role == "developer" else m.role
            if m.content is None:
                raise ApiError(400, f"messages[{i}].content: a message needs content", param=f"messages[{i}].content")
            if isinstance(m.content, str):
                turns.append((role, m.content))
                continue
            pieces = []
            for j, part in enumerate(m.content):
                if part.type == "text":
                    pieces.append(part.text)
                    continue
                where = f"messages[{i}].content[{j}].image_url"
                if not self.vision:
                    raise ApiError(400, f"{where}: {self.model} has no vision tower; send text only", param=where)
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                sources.append((where, self.image_source(url, where)))
                pieces.append(templates.IMAGE_MARK)
            turns.append((role, "\n".join(pieces)))
        if self.vision and self.template.images:
            marks = sum(text.count(templates.IMAGE_MARK) for _, text in turns)
            if marks != len(sources):
                raise ApiError(400, f"messages: {marks} {templates.IMAGE_MARK} marker(s) but {len(sources)} image "
                               "part(s); send images as image_url parts, not as text", param="messages")
        return turns, sources

    def chat_ids(self, turns) -> list[int]:
        try:
            if self.template.name == "none":  # as `tanuki generate --chat none`
                return templates.encode_text(self.tok, "".join(t for _, t in turns), self.vision)[0]
            return templates.prompt_ids(self.tok, self.template, turns)
        except (templates.ConversationError, ValueError) as e:
            raise ApiError(400, f"messages: {str(e).removeprefix('prompt: ')}", param="messages") from None

    def completion_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            if not prompt:
                raise ApiError(400, "prompt: empty", param="prompt")
            if isinstance(prompt[0], (str, list)):
                if len(prompt) != 1:
                    raise ApiError(400, f"prompt: a list of {len(prompt)} prompts; send one prompt per request",
                                   param="prompt")
                prompt = prompt[0]
        if isinstance(prompt, str):
            return templates.encode_text(self.tok, prompt, images=False)[0]
        bad = next((t for t in prompt if not 0 <= t < self.tok.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary [0, {self.tok.vocab_size})",
                           param="prompt")
        if not prompt:
            raise ApiError(400, "prompt: empty", param="prompt")
        return list(prompt)

    # -- sampling ----------------------------------------------------------------------------
    def sampling(self, req, max_tokens: int | None, prompt_tokens: int, logprobs: bool,
                 top_logprobs: int) -> SamplingOptions:
        def bad(field, message):
            return ApiError(400, f"{field}: {message}", param=field)

        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        top_k = 0 if req.top_k in (None, -1) else req.top_k
        if temperature < 0:
            raise bad("temperature", f"{temperature} must be >= 0 (0 = greedy)")
        if not 0 < top_p <= 1:
            raise bad("top_p", f"{top_p} must be in (0, 1]")
        if top_k < 0:
            raise bad("top_k", f"{top_k} must be >= 0 (0 or -1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise bad(name, "is not supported by this server (send 0 or leave it out)")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP or not all(stop):
            raise bad("stop", f"at most {MAX_STOP} non-empty strings")
        if max_tokens is not None:
            if max_tokens < 1:
                raise bad("max_tokens", f"{max_tokens} must be at least 1")
            if max_tokens > self.max_tokens:
                raise bad("max_tokens", f"{max_tokens} is over this server's limit of {self.max_tokens}")
            if prompt_tokens + max_tokens > self.context:
                raise bad("max_tokens", f"this model's context holds {self.context} tokens; the request asks "
                          f"for {prompt_tokens + max_tokens} ({prompt_tokens} in the prompt, {max_tokens} "
                          "to generate)")
        else:
            max_tokens = min(self.opts.default_max_tokens, self.max_tokens, self.context - prompt_tokens)
        return SamplingOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               stop=tuple(stop), logprobs=logprobs, top_logprobs=top_logprobs)

    async def plan(self, req, kind: str) -> _Plan:
        images = []
        if kind == "chat":
            turns, sources = self.chat_turns(req.messages)
            ids = self.chat_ids(turns)
            if sources:
                images = await asyncio.to_thread(self.load_images, sources)
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            top = req.top_logprobs or 0
            if not 0 <= top <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"top_logprobs: {top} must be in [0, {MAX_TOP_LOGPROBS}]", param="top_logprobs")
            if top and not req.logprobs:
                raise ApiError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
            want = bool(req.logprobs)
        else:
            ids = self.completion_ids(req.prompt)
            max_tokens, field = req.max_tokens, "max_tokens"
            top = req.logprobs or 0
            if not 0 <= top <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"logprobs: {top} must be in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")
            want = req.logprobs is not None
            for name, ok in (("echo", not req.echo), ("suffix", not req.suffix),
                             ("best_of", req.best_of in (None, 1, req.n))):
                if not ok:
                    raise ApiError(400, f"{name}: not supported by this server", param=name)
        n_images = sum(1 for t in ids if t == templates.IMAGE_TOKEN_ID)
        prompt_tokens = len(ids) + n_images * (self.image_tokens - 1)
        if prompt_tokens > self.max_prompt:
            where = "messages" if kind == "chat" else "prompt"
            raise ApiError(400, f"{where}: the prompt has {prompt_tokens} tokens; this server takes at most "
                           f"{self.max_prompt} (context {self.context})", param=where)
        try:
            sampling = self.sampling(req, max_tokens, prompt_tokens, want, top)
        except ApiError as e:
            if e.param == "max_tokens" and field != "max_tokens":
                e.message, e.param = field + e.message.removeprefix("max_tokens"), field
            raise
        if kind == "chat":  # the template's end-of-turn marks (raw completions stop where the client says)
            sampling.stop = tuple(dict.fromkeys(sampling.stop + self.template.stop))
        n = 1 if req.n is None else req.n
        if not 1 <= n <= MAX_N:
            raise ApiError(400, f"n: {n} must be in [1, {MAX_N}]", param="n")
        stream = bool(req.stream)
        include_usage = bool(stream and req.stream_options and req.stream_options.include_usage)
        return _Plan(kind, ids, images, prompt_tokens, sampling, n, stream, include_usage, want, top)

    def jobs(self, plan: _Plan, seed: int | None):
        seed = secrets.randbits(62) if seed is None else seed
        sampling = dataclasses.replace(plan.sampling, seed=seed)
        return [Job(key=f"choice-{i}", prompt=plan.ids, sampling=sampling, images=plan.images, stream=plan.stream)
                for i in range(plan.n)]

    # -- answers -----------------------------------------------------------------------------
    def _count(self, prompt_tokens: int, completion_tokens: int, t0: float) -> P.Usage:
        """Usage of a finished request, and the same numbers into /metrics."""
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(completion_tokens)
        self.metrics.e2e.observe(time.perf_counter() - t0)
        return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       total_tokens=prompt_tokens + completion_tokens)

    def answer(self, plan: _Plan, finals, t0: float) -> Response:
        """The non-streamed response from each choice's "done" event."""
        rid, created = _ids(plan.kind)
        chat = plan.kind == "chat"
        usage = self._count(max(e.prompt_tokens for e in finals), sum(e.completion_tokens for e in finals), t0)
        choices = []
        for i, e in enumerate(finals):
            c = _Choice()
            entries = c.entries(self.tok, e, plan.logprobs)
            logprobs = c.logprobs(entries, plan.top_logprobs, chat) if plan.logprobs else None
            choices.append(P.ChatChoice(index=i, message=P.ChatMessage(content=e.text), logprobs=logprobs,
                                        finish_reason=e.finish_reason) if chat else
                           P.CompletionChoice(index=i, text=e.text, logprobs=logprobs, finish_reason=e.finish_reason))
        body = (P.ChatCompletion if chat else P.Completion)(id=rid, created=created, model=self.model,
                                                            choices=choices, usage=usage)
        return Response(body.model_dump_json(), media_type="application/json")

    async def events(self, plan: _Plan, call: _Call, pending: list, t0: float):
        """The SSE body: role chunks (chat), each event as a chunk, each choice's finish chunk, the
        usage chunk when asked for, then [DONE]."""
        rid, created = _ids(plan.kind)
        chat = plan.kind == "chat"
        states = [_Choice() for _ in range(plan.n)]
        prompt_tokens, completion_tokens = 0, 0

        def chunk(i, text=None, logprobs=None, finish=None, role=None):
            if chat:
                c = P.ChatChunk(id=rid, created=created, model=self.model, choices=[P.ChatChunkChoice(
                    index=i, delta=P.ChatDelta(role=role, content=text), logprobs=logprobs, finish_reason=finish)])
            else:
                c = P.Completion(id=rid, created=created, model=self.model, choices=[P.CompletionChoice(
                    index=i, text=text or "", logprobs=logprobs, finish_reason=finish)])
            return P.sse(c, plan.include_usage)

        if chat:
            for i in range(plan.n):
                yield chunk(i, text="", role="assistant")
        while pending or not call.finished:
            i, event = pending.pop(0) if pending else await call.next()
            if event.kind == "error":  # after the stream opened: the engine failed it, or shutdown's grace ran out
                call.cancel()
                err = P.ErrorResponse(error=P.ErrorDetail(message=event.error or "the engine failed the request",
                                                          type="server_error"))
                yield f"data: {err.model_dump_json()}\n\n"
                yield P.SSE_DONE
                return
            entries = states[i].entries(self.tok, event, plan.logprobs)
            logprobs = states[i].logprobs(entries, plan.top_logprobs, chat) if plan.logprobs and entries else None
            if event.text or logprobs is not None:
                yield chunk(i, text=event.text, logprobs=logprobs)
            if event.kind == "done":
                prompt_tokens = max(prompt_tokens, event.prompt_tokens)
                completion_tokens += event.completion_tokens
                yield chunk(i, text=None if chat else "", finish=event.finish_reason)
        usage = self._count(prompt_tokens, completion_tokens, t0)
        if plan.include_usage:
            yield P.sse((P.ChatChunk if chat else P.Completion)(id=rid, created=created, model=self.model, choices=[],
                                                                usage=usage), True)
        yield P.SSE_DONE

    async def generate(self, request: Request, kind: str) -> Response:
        t0 = time.perf_counter()
        if self.loop.stopping.is_set():
            return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down").response()
        if self.active >= self.opts.max_concurrency:
            return ApiError(429, f"too many requests in progress (this server answers {self.opts.max_concurrency} at "
                            "once); retry later", type="rate_limit_error", code="rate_limit_exceeded",
                            headers={"Retry-After": str(RETRY_AFTER_S)}).response()
        self.active += 1
        call, handed_off = None, False
        try:
            req = self.parse(await self.body(request), kind)
            plan = await self.plan(req, kind)
            call = _Call(self, self.jobs(plan, req.seed), t0)
            if not plan.stream:
                return self.answer(plan, await _unless_gone(request, call.results(), call), t0)
            pending = await _unless_gone(request, call.first_events(), call)

            def on_close():
                call.cancel()
                self.active -= 1

            response = _EventStream(self.events(plan, call, pending, t0), on_close)
            handed_off = True
            return response
        except ApiError as e:
            return e.response()
        except (_ClientGone, ClientDisconnect):
            return Response(status_code=499)  # nobody reads it; counted in /metrics as 499
        finally:
            if not handed_off:
                self.active -= 1
                if call is not None:
                    call.cancel()


def _ids(kind: str) -> tuple[str, int]:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())


# ----------------------------------------------------------------------------- the app

def create_app(loop, tok, cfg, opts) -> FastAPI:
    """The OpenAI-compatible app on rank 0. ``loop``: a leader EngineLoop (serve_forever runs in
    another thread); ``cfg``: the checkpoint's model config; ``opts``: ServeOptions with
    ``max_seq_len`` (the effective context) and ``served_model_name`` filled in."""
    server = _Server(loop, tok, cfg, opts)
    app = FastAPI(title="tanuki serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tanuki = server
    app.add_middleware(_Gate, server=server)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return ApiError(400, f"invalid request: {e.errors()[0].get('msg', e)}").response()

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    @app.post(CHAT)
    async def chat_completions(request: Request):
        return await server.generate(request, "chat")

    @app.post(COMPLETIONS)
    async def completions(request: Request):
        return await server.generate(request, "completion")

    def card() -> P.ModelCard:
        return P.ModelCard(id=server.model, created=server.created, max_model_len=server.context)

    @app.get(MODELS)
    async def models():
        return JSONResponse(P.ModelList(data=[card()]).model_dump())

    @app.get(MODELS + "/{model:path}")
    async def model(model: str):
        if model != server.model:
            return ApiError(404, f"The model `{model}` does not exist; this server serves `{server.model}`.",
                            param="model", code="model_not_found").response()
        return JSONResponse(card().model_dump())

    @app.get("/health")
    async def health():
        if loop.stopping.is_set():
            return ApiError(503, "the server is shutting down", type="server_error", code="shutting_down").response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
