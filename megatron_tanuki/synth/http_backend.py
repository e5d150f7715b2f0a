"""The teacher behind an OpenAI-compatible HTTP API (ours, vLLM, NIM): one or more base URLs.

Why it looks like this: the synth scheduler keeps each conversation's next turn in flight as soon as
the previous one returns, so this backend must take many requests at once, never lose one, and cope
with what a shared server does under load -- 429 with Retry-After, 5xx, dropped connections, read
timeouts, a truncated body. So:

* every request retries with exponential backoff + jitter on 429, 408/409, 5xx, connection errors,
  timeouts and malformed bodies (Retry-After, in seconds or as an HTTP date, is a lower bound on the
  wait); other 4xx come back at once as an error naming the URL and the server's message;
* each attempt goes to the base URL with the fewest attempts in flight (ties: round robin), so a
  retry may land on another server; a URL whose attempts keep failing is skipped for a while
  (exponential cooldown, cleared by its next success) unless every URL is failing;
* the number of requests it accepts (``capacity()``) adapts, AIMD: halve on a 429 or a connection
  error (at most once per second), -10% when the median latency per output token of the last 32
  successes exceeds twice the best median seen (at most once per 32 successes, no growth meanwhile),
  else +1 after every ``limit`` successes. Attempts beyond the current limit wait in the backend, so
  a shrink takes effect at once, also for retries of requests already accepted.

Threading: the scheduler is synchronous. A daemon thread runs an asyncio loop with one
``httpx.AsyncClient`` per base URL (keep-alive, pool sized to ``max_concurrency``); ``submit()``
hands a request to that loop, results land on a ``queue.Queue`` that ``poll()`` drains. What both
threads read (limit, in-flight count, counters) is guarded by one lock.
"""
from __future__ import annotations

import asyncio
import email.utils
import math
import queue
import random
import statistics
import threading
import time
from collections import deque
from datetime import timezone

from megatron_tanuki.synth.backend import BackendStats, TurnRequest, TurnResult

RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx
HALVE_EVERY_S = 1.0                         # at most one halving per this window
LATENCY_WINDOW = 32                         # successes in the latency median
LATENCY_RISE = 2.0                          # median / best median that counts as "rising"
KEEPALIVE_S = 2.0                           # idle keep-alive below servers' usual 5 s, so a reused
                                            # connection is not one the server is closing
RETRY_AFTER_MAX_S = 3600.0


class _Failure(Exception):
    """One failed attempt: its kind ("http_429", "connection", ...), a one-line message, whether to retry."""

    def __init__(self, kind: str, message: str, retry: bool, retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.message, self.retry, self.retry_after = kind, message, retry, retry_after
        self.url_index: int | None = None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta seconds or an HTTP date); None if absent or unreadable."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def _server_message(resp) -> str:
    """The server's own words for a failed response, on one line (OpenAI, FastAPI or plain-text shape)."""
    msg = None
    try:
        body = resp.json()
        if isinstance(body, dict):
            err = body.get("error")
            msg = err.get("message") if isinstance(err, dict) else err
            msg = msg or body.get("message") or body.get("detail")
    except ValueError:
        pass
    text = str(msg) if msg else resp.text
    text = " ".join(text.split())[:300]
    return text or resp.reason_phrase or "(empty body)"


def with_images(req: TurnRequest) -> list[dict]:
    """The request's messages with its image files as OpenAI ``image_url`` parts (base64 data URLs), each
    where an "<image>" mark stands; with no mark, all images go before the first user message's text
    (as the engine backend does)."""
    import base64
    import mimetypes

    from megatron_tanuki.data.templates import IMAGE_MARK

    def part(path: str) -> dict:
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode()
        mime = mimetypes.guess_type(path)[0] or "image/png"
        return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}

    messages = [dict(m) for m in req.messages]
    marks = sum(str(m.get("content") or "").count(IMAGE_MARK) for m in messages)
    if marks == 0:
        first_user = next((m for m in messages if m.get("role") == "user"), None)
        if first_user is None:
            raise ValueError("the request has images but no user message to carry them")
        first_user["content"] = IMAGE_MARK * len(req.images) + str(first_user.get("content") or "")
    elif marks != len(req.images):
        raise ValueError(f"{marks} {IMAGE_MARK} marks in the messages but {len(req.images)} images")
    images = iter(req.images)
    for m in messages:
        text = str(m.get("content") or "")
        if IMAGE_MARK not in text:
            continue
        parts = []
        for k, piece in enumerate(text.split(IMAGE_MARK)):
            if k:
                parts.append(part(next(images)))
            if piece.strip():
                parts.append({"type": "text", "text": piece.strip("\n")})
        m["content"] = parts
    return messages


class OpenAIBackend:
    """Chat completions against ``base_urls`` with retries, load balancing and adaptive concurrency.

    The backend surface of ``synth/backend.py``: submit / poll / capacity / in_flight / stats / close.
    ``TurnResult.latency_s`` is the time from submit() to the result (queueing and retries included).
    """

    def __init__(self, base_urls: list[str], model: str | None = None, api_key: str | None = None, *,
                 timeout_s: float = 600, max_retries: int = 8, concurrency: int = 32,
                 min_concurrency: int = 1, max_concurrency: int = 512, backoff_s: float = 1.0,
                 backoff_max_s: float = 60.0):
        import httpx

        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls or [])
        if not urls:
            raise ValueError("OpenAIBackend: no base URL given (e.g. --base-url http://node1:8000/v1)")
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")) \
                    or len(url.split("://", 1)[1].strip("/")) == 0:
                raise ValueError(f"OpenAIBackend: base URL {url!r} must start with http:// or https:// "
                                 "and name a host (e.g. http://node1:8000/v1)")
        if not 1 <= min_concurrency <= concurrency <= max_concurrency:
            raise ValueError("OpenAIBackend: need 1 <= min_concurrency <= concurrency <= max_concurrency, got "
                             f"{min_concurrency}, {concurrency}, {max_concurrency}")
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0 or backoff_max_s < backoff_s:
            raise ValueError("OpenAIBackend: need max_retries >= 0, timeout_s > 0, 0 <= backoff_s <= backoff_max_s; "
                             f"got {max_retries}, {timeout_s}, {backoff_s}, {backoff_max_s}")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.model, self.max_retries, self.timeout_s = model, max_retries, timeout_s
        self.min_concurrency, self.max_concurrency = min_concurrency, max_concurrency
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s

        # shared with the caller's thread, under _lock
        self._lock = threading.Lock()
        self._results: queue.Queue[TurnResult] = queue.Queue()
        self._in_flight = 0
        self._limit = concurrency
        self._retries: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._closed = False
        # AIMD state (loop thread; read under _lock by stats())
        self._successes = 0                          # since the limit last changed
        self._since_latency_shrink = LATENCY_WINDOW  # successes since the last latency shrink
        self._latency = deque(maxlen=LATENCY_WINDOW)  # seconds per output token of recent successes
        self._best_median = math.inf
        self._last_halve = -math.inf
        # loop-thread only
        self._sending = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._url_load = [0] * len(self.base_urls)
        self._url_streak = [0] * len(self.base_urls)        # failed attempts in a row
        self._url_down_until = [0.0] * len(self.base_urls)  # skipped until then, while another is up
        self._round_robin = 0
        self._models: dict[int, str] = {}
        self._model_locks = [asyncio.Lock() for _ in self.base_urls]
        self._jitter = random.Random()

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency,
                              keepalive_expiry=KEEPALIVE_S)
        self._clients = [httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, headers=headers)
                         for _ in self.base_urls]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="openai-backend", daemon=True)
        self._thread.start()

    # ---- the backend surface (caller's thread) ----

    def submit(self, req: TurnRequest) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("OpenAIBackend: submit() after close()")
            self._in_flight += 1
        asyncio.run_coroutine_threadsafe(self._run(req, time.monotonic()), self._loop)

    def poll(self, timeout: float) -> list[TurnResult]:
        with self._lock:
            waiting = self._in_flight > 0
        out = []
        try:
            if not waiting:
                out.append(self._results.get_nowait())
            elif timeout is None or timeout > 0:
                out.append(self._results.get(timeout=timeout))
            else:
                out.append(self._results.get_nowait())
        except queue.Empty:
            return out
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def capacity(self) -> int:
        with self._lock:
            return 0 if self._closed else max(0, self._limit - self._in_flight)

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def stats(self) -> BackendStats:
        with self._lock:
            return BackendStats(retries=dict(self._retries), errors=dict(self._errors), concurrency=self._limit)

    def close(self) -> None:
        """Cancel what is pending (those requests get no result), close the clients, join the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self._loop.close()
        with self._lock:
            self._in_flight = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the loop thread ----

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _shutdown(self) -> None:
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in self._clients:
            await client.aclose()

    async def _run(self, req: TurnRequest, submitted: float) -> None:
        """One request to its end: attempts, backoff between them, one result on the queue."""
        retries, avoid = 0, None
        try:
            try:
                messages = await asyncio.to_thread(with_images, req) if req.images else req.messages
            except (OSError, ValueError) as e:
                raise _Failure("request", f"{req.key}: {e}", False) from None
            while True:
                try:
                    result = await self._attempt(req, messages, avoid)
                    break
                except _Failure as f:
                    if not f.retry or retries >= self.max_retries:
                        result = TurnResult(req.key, finish_reason="error", error=f.message, error_kind=f.kind)
                        self._count(self._errors, f.kind)
                        break
                    retries += 1
                    self._count(self._retries, f.kind)
                    if f.kind in ("http_429", "connection"):
                        self._halve()
                    avoid = f.url_index
                    await asyncio.sleep(self._backoff(retries, f.retry_after))
        except asyncio.CancelledError:
            raise
        except _Failure as f:  # the request itself is unusable: nothing was sent
            result = TurnResult(req.key, finish_reason="error", error=f.message, error_kind=f.kind)
            self._count(self._errors, f.kind)
        except Exception as e:  # a bug here must still answer the request, not leave it in flight forever
            result = TurnResult(req.key, finish_reason="error", error=f"{type(e).__name__}: {e}",
                                error_kind="internal")
            self._count(self._errors, "internal")
        result.retries = retries
        result.latency_s = time.monotonic() - submitted
        with self._lock:
            self._in_flight -= 1
            self._results.put(result)

    async def _attempt(self, req: TurnRequest, messages: list[dict], avoid: int | None) -> TurnResult:
        await self._acquire()
        idx = self._pick_url(avoid)
        self._url_load[idx] += 1
        try:
            model = await self._model_for(idx)
            payload = {"model": model, "messages": messages, "temperature": req.temperature,
                       "top_p": req.top_p, "max_tokens": req.max_tokens, "stop": list(req.stop) or None,
                       "seed": req.seed}
            endpoint = f"{self.base_urls[idx]}/chat/completions"
            start = time.monotonic()
            resp = await self._send(idx, "POST", endpoint, payload)
            result = self._parse(req.key, resp, endpoint)
            self._on_success(time.monotonic() - start, result.completion_tokens)
            self._url_streak[idx], self._url_down_until[idx] = 0, 0.0
            return result
        except _Failure as f:
            f.url_index = idx
            if f.retry:
                self._url_streak[idx] += 1
                cooldown = min(self.backoff_max_s, max(self.backoff_s, 0.05) * 2 ** (self._url_streak[idx] - 1))
                self._url_down_until[idx] = time.monotonic() + cooldown
            raise
        finally:
            self._url_load[idx] -= 1
            self._release()

    async def _send(self, idx: int, method: str, endpoint: str, payload: dict | None = None):
        """One HTTP exchange; a non-2xx status or a transport failure raises :class:`_Failure`."""
        import httpx

        try:
            resp = await self._clients[idx].request(method, endpoint, json=payload)
        except httpx.ConnectTimeout as e:
            raise _Failure("connection", f"{endpoint}: {type(e).__name__}: {e}", True) from None
        except httpx.TimeoutException as e:
            raise _Failure("timeout", f"{endpoint}: {type(e).__name__}: no answer within {self.timeout_s} s",
                           True) from None
        except httpx.DecodingError as e:
            raise _Failure("bad_response", f"{endpoint}: {type(e).__name__}: {e}", True) from None
        except httpx.TransportError as e:
            raise _Failure("connection", f"{endpoint}: {type(e).__name__}: {e}", True) from None
        except httpx.HTTPError as e:
            raise _Failure("request", f"{endpoint}: {type(e).__name__}: {e}", False) from None
        status = resp.status_code
        if 200 <= status < 300:
            return resp
        retry = status in RETRY_STATUS or 500 <= status <= 599
        raise _Failure(f"http_{status}", f"{endpoint}: HTTP {status}: {_server_message(resp)}", retry,
                       parse_retry_after(resp.headers.get("retry-after")) if retry else None)

    async def _model_for(self, idx: int) -> str:
        """The given model name, else the first id that GET {base_url}/models lists (asked once per URL)."""
        if self.model:
            return self.model
        if idx in self._models:
            return self._models[idx]
        async with self._model_locks[idx]:
            if idx not in self._models:
                endpoint = f"{self.base_urls[idx]}/models"
                resp = await self._send(idx, "GET", endpoint)
                try:
                    ids = [m["id"] for m in resp.json()["data"]]
                except (ValueError, KeyError, TypeError) as e:
                    raise _Failure("bad_response", f"{endpoint}: malformed model list ({type(e).__name__}: {e}): "
                                   f"{resp.text[:200]!r}", True) from None
                if not ids or not isinstance(ids[0], str):
                    raise _Failure("no_model", f"{endpoint}: the server lists no model; pass the model name", False)
                self._models[idx] = ids[0]
        return self._models[idx]

    @staticmethod
    def _parse(key: str, resp, endpoint: str) -> TurnResult:
        try:
            body = resp.json()
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
            if not isinstance(text, str):
                raise TypeError(f"message.content is {type(text).__name__}")
            text = text.encode("utf-8", "replace").decode("utf-8")  # a lone surrogate cannot be written as UTF-8
            usage = body.get("usage") or {}
            return TurnResult(key, text=text, finish_reason=choice.get("finish_reason") or "stop",
                              prompt_tokens=int(usage.get("prompt_tokens") or 0),
                              completion_tokens=int(usage.get("completion_tokens") or 0))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise _Failure("bad_response", f"{endpoint}: malformed response body ({type(e).__name__}: {e}): "
                           f"{resp.text[:200]!r}", True) from None

    def _pick_url(self, avoid: int | None) -> int:
        """The least-loaded URL among those not cooling down after failures (all, if every one is)."""
        n, now = len(self.base_urls), time.monotonic()
        order = [(self._round_robin + k) % n for k in range(n)]
        up = [i for i in order if self._url_down_until[i] <= now] or order
        idx = min(up, key=lambda i: (self._url_load[i], i == avoid))
        self._round_robin = (idx + 1) % n
        return idx

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        wait = min(self.backoff_max_s, self.backoff_s * 2 ** (retry - 1))
        wait = wait / 2 + self._jitter.uniform(0, wait / 2)
        return wait if retry_after is None else max(wait, retry_after)

    def _count(self, counter: dict, kind: str) -> None:
        with self._lock:
            counter[kind] = counter.get(kind, 0) + 1

    # ---- adaptive concurrency ----

    async def _acquire(self) -> None:
        """Wait for a send slot: at most the current limit of attempts on the wire."""
        if self._sending < self._limit and not self._waiters:
            self._sending += 1
            return
        fut = self._loop.create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()
            raise

    def _release(self) -> None:
        self._sending -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._sending < self._limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._sending += 1
                fut.set_result(None)

    def _halve(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_halve < HALVE_EVERY_S:
                return
            self._last_halve = now
            self._limit = max(self.min_concurrency, self._limit // 2)
            self._successes = 0

    def _on_success(self, seconds: float, completion_tokens: int) -> None:
        self._latency.append(seconds / max(1, completion_tokens))
        with self._lock:
            self._since_latency_shrink += 1
            if len(self._latency) == LATENCY_WINDOW:
                median = statistics.median(self._latency)
                rising = median > LATENCY_RISE * self._best_median
                self._best_median = min(self._best_median, median)
                if rising:
                    if self._since_latency_shrink >= LATENCY_WINDOW:
                        self._limit = max(self.min_concurrency, int(self._limit * 0.9))
                        self._since_latency_shrink = 0
                        self._successes = 0
                    return
            self._successes += 1
            if self._successes >= self._limit:
                self._successes = 0
                self._limit = min(self.max_concurrency, self._limit + 1)
        self._wake()
