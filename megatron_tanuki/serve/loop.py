"""The engine loop behind `tanuki serve`: every rank steps the engine together; rank 0 feeds it.

Why our own broadcast and not megatron-core's coordinator: the coordinator (ZMQ + msgpack) carries
token ids and sampling params only, while our requests carry images and per-request seeds, and
cancellation must reach every rank in the same step. One ``broadcast_object_list`` per iteration
from rank 0 carries the step's new requests, cancellations and the exit flag; every rank applies
them in the same order, then all step. Idle, rank 0 still broadcasts a heartbeat about once a
second, so the other ranks never sit in a collective long enough to time out.

The HTTP side (another thread on rank 0) talks to :class:`EngineLoop` only through
:meth:`EngineLoop.submit` / :meth:`EngineLoop.cancel` / :meth:`EngineLoop.shutdown` (a thread-safe
queue) and receives :class:`Event` objects through each job's ``sink`` callback (called on the loop
thread: the server hands them to its event loop with ``call_soon_threadsafe``).

Every job submitted gets a last event ("done" or "error"), except one its caller cancelled: at
shutdown, jobs still running when the grace period ends, and jobs that arrive after the last
broadcast, get an "error" event (:data:`SHUTDOWN_ERROR`), so no HTTP request waits on a loop
that has gone.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

from megatron_tanuki.inference.engine import Completion, Engine, RequestError, SamplingOptions

HEARTBEAT_S = 1.0
IDLE_WAIT_S = 0.02
SHUTDOWN_ERROR = "the server is shutting down: this request did not finish within the shutdown grace period"


@dataclass
class Job:
    """One engine request from an HTTP call (a call with ``n`` choices makes ``n`` jobs)."""

    key: str                      # seeds the request (with ``sampling.seed``)
    prompt: list[int]
    sampling: SamplingOptions
    images: list = field(default_factory=list)
    stream: bool = False
    sink: object = None           # callable(Event), rank 0 only


@dataclass
class Event:
    kind: str                     # "delta" | "done" | "error"
    text: str = ""                # delta: new text; done: the rest of the text
    tokens: list[int] = field(default_factory=list)      # the new tokens
    logprobs: list[float] | None = None
    top_logprobs: list[dict] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class _Stream:
    """Rank 0's view of one streaming job: what was sent, what must be held back."""

    def __init__(self, job: Job):
        self.job = job
        self.sent_text = ""
        self.sent_tokens = 0
        self.stops = [s for s in job.sampling.stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def delta(self, tok, tokens: list[int], logprobs, top=None) -> Event | None:
        """The text that is safe to send: it ends before the first complete stop string (the engine
        finishes such a request one step later, with one more token it then drops) and before the
        last ``hold`` characters (they may begin a stop string), on a whole character."""
        if len(tokens) <= self.sent_tokens:
            return None
        text = tok.decode(tokens)
        hits = [text.find(s) for s in self.stops if s in text]
        safe = min(hits) if hits else len(text) - self.hold
        while safe > len(self.sent_text) and text[safe - 1] == "\ufffd":  # an unfinished UTF-8 character
            safe -= 1
        if safe <= len(self.sent_text) or not text.startswith(self.sent_text):
            return None
        new_tokens = tokens[self.sent_tokens:]
        event = Event("delta", text=text[len(self.sent_text):safe], tokens=new_tokens,
                      logprobs=list(logprobs[self.sent_tokens:len(tokens)]) if logprobs is not None else None,
                      top_logprobs=list(top[self.sent_tokens:len(tokens)]) if top is not None else None)
        self.sent_text, self.sent_tokens = text[:safe], len(tokens)
        return event

    def finish(self, c: Completion) -> Event:
        rest = c.text[len(self.sent_text):] if c.text.startswith(self.sent_text) else ""
        return _done(c, text=rest, tokens=c.tokens[self.sent_tokens:],
                     logprobs=c.logprobs[self.sent_tokens:] if c.logprobs is not None else None,
                     top=c.top_logprobs[self.sent_tokens:] if c.top_logprobs is not None else None)


def _done(c: Completion, text=None, tokens=None, logprobs=None, top=None) -> Event:
    if c.error is not None:
        return Event("error", error=c.error, prompt_tokens=c.prompt_tokens)
    return Event("done", text=c.text if text is None else text, tokens=c.tokens if tokens is None else tokens,
                 logprobs=c.logprobs if logprobs is None else logprobs,
                 top_logprobs=c.top_logprobs if top is None else top, finish_reason=c.finish_reason,
                 prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)


class EngineLoop:
    """Owns the engine on this rank. ``leader``: this rank takes HTTP jobs and broadcasts them."""

    def __init__(self, engine: Engine, tok, leader: bool, world_size: int = 1):
        self.engine, self.tok, self.leader, self.world = engine, tok, leader, world_size
        # SimpleQueue: its put is reentrant, and shutdown() is called from a signal handler that may
        # interrupt this thread inside get() (a queue.Queue would deadlock on its own lock there)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handles = itertools.count()
        self._rid: dict[int, int] = {}          # handle -> engine request id
        self._handle_of: dict[int, int] = {}    # engine request id -> handle
        self._jobs: dict[int, Job] = {}         # handle -> job (leader)
        self._streams: dict[int, _Stream] = {}
        self.stopping = threading.Event()
        self._closing = threading.Lock()
        self._closed = False                    # serve_forever has returned: submit answers at once
        self.stats = {"waiting": 0, "in_flight": 0, "kv_usage": 0.0, "steps": 0}

    # -- the HTTP thread's side ------------------------------------------------------------------
    def submit(self, job: Job) -> int:
        """Queue a job; once the loop has returned, the job's sink hears the shutdown error at once
        (a request that passed the HTTP side's "stopping" check just before SIGTERM must not wait
        for an answer that would never come)."""
        handle = next(self._handles)
        with self._closing:
            if not self._closed:
                self.inbox.put(("add", handle, job))
                return handle
        if job.sink is not None:
            job.sink(Event("error", error=SHUTDOWN_ERROR, prompt_tokens=len(job.prompt)))
        return handle

    def cancel(self, handle: int) -> None:
        self.inbox.put(("cancel", handle, None))

    def shutdown(self, grace_s: float) -> None:
        """Stop after in-flight jobs finish or ``grace_s`` passes; safe to call from a signal handler."""
        self.inbox.put(("exit", grace_s, None))

    # -- every rank ------------------------------------------------------------------------------
    def _collect(self) -> dict:
        """Leader: this iteration's commands. With nothing to step it waits for one (at most a
        heartbeat's time, then shares an empty command so the other ranks hear from it)."""
        cmd = {"add": [], "cancel": [], "exit": None}
        idle = not self.engine.has_work()
        deadline = time.monotonic() + HEARTBEAT_S
        while True:
            try:
                kind, a, b = self.inbox.get_nowait()
            except queue.Empty:
                empty = not (cmd["add"] or cmd["cancel"]) and cmd["exit"] is None
                if not (idle and empty and time.monotonic() < deadline):
                    return cmd
                try:
                    kind, a, b = self.inbox.get(timeout=IDLE_WAIT_S)
                except queue.Empty:
                    continue
            if kind == "add":
                self._jobs[a] = b
                cmd["add"].append((a, b.key, b.prompt, b.sampling, b.images))
            elif kind == "cancel":
                cmd["cancel"].append(a)
            else:
                cmd["exit"] = a

    def _share(self, cmd: dict | None) -> dict:
        if self.world == 1:
            return cmd
        import torch.distributed as dist

        box = [cmd]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _apply(self, cmd: dict) -> None:
        for handle, key, prompt, sampling, images in cmd["add"]:
            try:
                rid = self.engine.submit(key, prompt, sampling, images)
            except RequestError as e:
                self._emit(handle, Event("error", error=str(e), prompt_tokens=len(prompt)))
                self._forget(handle)
                continue
            self._rid[handle], self._handle_of[rid] = rid, handle
            if self.leader and self._jobs[handle].stream:
                self._streams[handle] = _Stream(self._jobs[handle])
        for handle in cmd["cancel"]:
            rid = self._rid.get(handle)
            if rid is not None and self.engine.cancel(rid):
                self._forget(handle)

    def _emit(self, handle: int, event: Event) -> None:
        job = self._jobs.get(handle)
        if self.leader and job is not None and job.sink is not None:
            job.sink(event)

    def _forget(self, handle: int) -> None:
        rid = self._rid.pop(handle, None)
        self._handle_of.pop(rid, None)
        self._jobs.pop(handle, None)
        self._streams.pop(handle, None)

    def _abandon(self, handle: int) -> None:
        """Leader, grace over: the job's caller gets its last event now (a cancelled request sends
        none of its own) and nothing after it; the cancel reaches every rank with the next broadcast."""
        if self._jobs.get(handle) is None:
            return
        self._emit(handle, Event("error", error=SHUTDOWN_ERROR))
        self._jobs[handle] = None
        self._streams.pop(handle, None)
        self.inbox.put(("cancel", handle, None))

    def _refuse_unsent(self) -> None:
        """Leaving: jobs submitted after the last broadcast are answered, not left waiting."""
        with self._closing:
            self._closed = True
        while self.leader:
            try:
                kind, handle, job = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add" and job.sink is not None:
                job.sink(Event("error", error=SHUTDOWN_ERROR, prompt_tokens=len(job.prompt)))

    def _publish(self, done: list[Completion]) -> None:
        finished = set()
        for c in done:
            handle = self._handle_of.get(c.request_id)
            if handle is None:
                continue
            finished.add(handle)
            if c.finish_reason != "cancelled":
                stream = self._streams.get(handle)
                self._emit(handle, stream.finish(c) if stream else _done(c))
            self._forget(handle)
        if not self.leader:
            return
        for handle, stream in list(self._streams.items()):
            rid = self._rid.get(handle)
            if rid is None or handle in finished:
                continue
            tokens = self.engine.generated(rid)
            logprobs = top = None
            sampling = stream.job.sampling
            if (sampling.logprobs or sampling.top_logprobs) and rid in self.engine.engine.requests:
                # every part of the request's record: after an eviction the live request holds only
                # what came since
                parts = self.engine.engine.requests[rid].record.requests
                logprobs = [x for r in parts for x in (r.generated_log_probs or [])]
                top = [x for r in parts for x in (r.generated_top_n_logprobs or [])] if sampling.top_logprobs else None
                if len(logprobs) < len(tokens) or (top is not None and len(top) < len(tokens)):
                    continue  # not there yet: these tokens go out with the next delta
            event = stream.delta(self.tok, tokens, logprobs, top)
            if event is not None:
                self._emit(handle, event)

    def serve_forever(self, alive=None) -> None:
        """Until an exit command: collect (leader), share, apply, step, publish. ``alive`` (leader):
        a callable that turns False when the HTTP side died -- the loop then shuts down instead of
        holding the ranks forever. An exception on the leader answers every open job first."""
        try:
            self._serve(alive)
        except BaseException:
            if self.leader:
                for handle, job in list(self._jobs.items()):
                    if job is not None:
                        self._emit(handle, Event("error", error="internal server error: the engine loop failed"))
                self._refuse_unsent()
            raise

    def _serve(self, alive) -> None:
        exit_at = None
        while True:
            mine = self._collect() if self.leader else None
            if mine is not None and alive is not None and mine["exit"] is None and not alive():
                mine["exit"] = 0.0
            cmd = self._share(mine)
            self._apply(cmd)
            if cmd["exit"] is not None and exit_at is None:
                exit_at = time.monotonic() + float(cmd["exit"])
                self.stopping.set()
            if exit_at is not None:
                if not self.engine.has_work():
                    self._refuse_unsent()
                    return
                if time.monotonic() >= exit_at and self.leader:  # grace over: cancel what is left
                    for handle in list(self._rid):
                        self._abandon(handle)
            if self.engine.has_work():
                done = self.engine.step()
                self._publish(done)
            self.stats.update(in_flight=self.engine.in_flight, kv_usage=self.engine.kv_usage(),
                              waiting=len(self.engine.engine.waiting_request_ids), steps=self.engine.steps)
