"""The scheduler of `tanuki synth run`: continuous per-conversation scheduling over any backend.

Each conversation's next turn is submitted the moment its previous answer returns, and new
conversations start whenever the backend has room, so the teacher always has ``capacity()`` requests
in flight -- no stage barrier (the seed team's script waited for the slowest of 96 Q1s before any A1
started). Completed conversations are appended (whole line, fsync) as they finish.

Crash safety: a rerun skips every id in the data and reject files. A conversation in flight when the
process died is redone from its first turn: with per-request seeded sampling it comes out the same on
our engine, it costs at most ``capacity`` conversations of work, and there is no journal that could
disagree with the data file. SIGTERM / SIGUSR1 stop new conversations, give the running ones
``grace_s`` to finish, drop the rest (redone by the rerun) and return normally (exit 0, for Slurm
requeue).

Every rank of a model-parallel engine runs this same loop; its decisions depend only on the answers
(identical on every rank) and on flags the backend agrees on (``agree``), so all ranks submit the same
requests in the same order.
"""
from __future__ import annotations

import collections
import signal
import sys
import time
from dataclasses import dataclass

from megatron_tanuki.synth.conversation import ABANDON, DONE, REJECT, Conversation
from megatron_tanuki.synth.store import Store, in_shard


@dataclass
class RunOptions:
    limit: int | None = None          # at most this many conversation slots (trying a recipe small)
    shard: tuple[int, int] = (0, 1)
    progress: bool | None = None      # None: when stderr is a terminal (TANUKI_PROGRESS forces)
    progress_every_s: float = 10.0
    ceiling_tps: float | None = None  # the backend's tokens/s at saturation (bench_generate), for efficiency
    grace_s: float = 120.0            # after SIGTERM/SIGUSR1: time the running conversations get
    max_error_streak: int = 64        # teacher failures in a row (after the backend's own retries) = it is down


# the teacher is misconfigured, not busy: no point asking again (HTTP 401/403/404, no model listed)
FATAL_KINDS = {"http_401", "http_403", "http_404", "no_model"}


class TeacherDown(RuntimeError):
    """The run stopped because the teacher keeps failing; what is written is kept, a rerun continues."""


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (installed in the main thread) or by a caller (tests, bench)."""

    def __init__(self):
        self.at: float | None = None

    def set(self, *_):
        if self.at is None:
            self.at = time.monotonic()

    @property
    def requested(self) -> bool:
        return self.at is not None

    def install(self):
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
        for s in previous:
            signal.signal(s, self.set)
        return previous


class Stats:
    def __init__(self, target: int, skipped: int):
        self.t0 = time.monotonic()
        self.target, self.skipped = target, skipped
        self.done = self.rejected = self.retried = self.failed = 0   # failed: teacher errors (left for a rerun)
        self.turns = collections.Counter()           # answers accepted per turn
        self.tokens = collections.Counter()          # completion tokens per turn
        self.prompt_tokens = 0
        self.retry_reasons = collections.Counter()
        self.peak_in_flight = 0

    def elapsed(self) -> float:
        return max(1e-9, time.monotonic() - self.t0)

    def completion_tokens(self) -> int:
        return sum(self.tokens.values())


def run(recipe, store: Store, backend, opts: RunOptions | None = None, stop: StopFlag | None = None,
        log=print) -> dict:
    """Run (or resume) the recipe's conversations of this shard; returns the summary."""
    opts = opts or RunOptions()
    stop = stop or StopFlag()
    done = store.open()
    slots = min(recipe.count, opts.limit) if opts.limit else recipe.count
    mine = [(i, cid) for i in range(slots) if in_shard(cid := recipe.conversation_id(i), opts.shard)]
    skipped = sum(1 for _, cid in mine if cid in done)
    todo = iter([i for i, cid in mine if cid not in done])
    stats = Stats(len(mine), skipped)
    progress = _Progress(stats, backend, opts, log)
    pending: dict[str, Conversation] = {}
    ready: collections.deque[Conversation] = collections.deque()
    exhausted = stopping = expired = stop_logged = False
    streak = 0
    agree = getattr(backend, "agree", lambda *flags: flags)  # multi-rank engines reduce the flags
    try:
        while True:
            while not stopping and not exhausted and backend.capacity() > len(ready):
                i = next(todo, None)
                if i is None:
                    exhausted = True
                else:
                    ready.append(Conversation(recipe, i))
            while ready and backend.capacity() > 0:
                conv = ready.popleft()
                req = conv.request()
                pending[req.key] = conv
                backend.submit(req)
            stats.peak_in_flight = max(stats.peak_in_flight, len(pending))
            if not pending and (exhausted or stopping) and not ready:
                break
            if stopping and not pending:
                break
            for res in backend.poll(0.2):
                conv = pending.pop(res.key, None)
                if conv is None:
                    continue
                turn = conv.current.name
                outcome = conv.accept(res)
                stats.prompt_tokens += res.prompt_tokens
                stats.tokens[turn] += res.completion_tokens
                if outcome == ABANDON:  # the teacher failed, not the answer: the rerun does it again
                    stats.failed += 1
                    streak += 1
                    if res.error_kind in FATAL_KINDS or streak >= opts.max_error_streak:
                        raise TeacherDown(
                            f"the teacher failed {streak} request(s) in a row"
                            f"{' (a configuration error: no use retrying)' if res.error_kind in FATAL_KINDS else ''}"
                            f"; last: {conv.reject_reason}. {stats.done} conversation(s) were written this run and "
                            "are kept; the same command continues once the teacher answers")
                    continue
                streak = 0
                if outcome == DONE:
                    stats.turns[turn] += 1
                    stats.done += 1
                    store.write(conv.record())
                elif outcome == REJECT:
                    stats.rejected += 1
                    stats.retry_reasons[_kind(conv.reject_reason)] += 1
                    store.reject(conv.reject_record())
                else:
                    if conv.attempt:
                        stats.retried += 1
                        stats.retry_reasons[_kind(conv.failures[-1])] += 1
                    else:
                        stats.turns[turn] += 1
                    ready.appendleft(conv)  # a running conversation goes before new ones
            now_stop = stop.requested
            now_expired = stop.requested and time.monotonic() - stop.at > opts.grace_s
            stopping, expired = agree(now_stop, now_expired)
            if stopping and not stop_logged:
                stop_logged = True
                ready = collections.deque(c for c in ready if c.turn or c.attempt)  # not started: left
                log(f"[synth] stop requested: no new conversations; {len(pending) + len(ready)} running get "
                    f"{opts.grace_s:.0f} s to finish, the rest are redone by the rerun")
            if expired:
                break
            progress.tick(len(pending))
    except TeacherDown as e:
        store.write_summary({**_summary(stats, backend, opts, abandoned=len(pending) + len(ready) + stats.failed,
                                        stopped=True), "error": str(e)})
        raise
    finally:
        progress.close()
    summary = _summary(stats, backend, opts, abandoned=len(pending) + len(ready) + stats.failed, stopped=stopping)
    store.write_summary(summary)
    return summary


def _kind(reason: str | None) -> str:
    reason = reason or "unknown"
    if reason.startswith("backend error"):
        return reason.split(")")[0] + ")"
    return reason.split(" at ")[0].split(" '")[0].split(" (")[0]


class _Progress:
    def __init__(self, stats: Stats, backend, opts: RunOptions, log):
        from megatron_tanuki.runtime.progress import progress_disabled

        self.stats, self.backend, self.opts, self.log = stats, backend, opts, log
        self.enabled = not progress_disabled(opts.progress)
        self.last = time.monotonic()

    def tick(self, in_flight: int) -> None:
        if not self.enabled or time.monotonic() - self.last < self.opts.progress_every_s:
            return
        self.last = time.monotonic()
        print(line(self.stats, self.backend, in_flight), file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def line(stats: Stats, backend, in_flight: int) -> str:
    """conversations done / target, turns in flight, tokens/s per stage, errors, ETA."""
    s, el = stats, stats.elapsed()
    finished = s.done + s.rejected
    remaining = s.target - s.skipped - finished
    rate = finished / el
    eta = f"{remaining / rate:.0f} s" if rate > 0 else "?"
    per_turn = " ".join(f"{t} {n / el:.0f}" for t, n in s.tokens.items())
    b = backend.stats()
    retried = " ".join(f"{k} {v}" for k, v in sorted(b.retries.items())) or "none"
    failed = " ".join(f"{k} {v}" for k, v in sorted(b.errors.items())) or "none"
    return (f"[synth] {s.skipped + finished}/{s.target} conversations | {in_flight} turns in flight | "
            f"tok/s {per_turn or '-'} | rejects {s.rejected} retried turns {s.retried} | teacher retried {retried}, "
            f"failed {failed} | ETA {eta}")


def _summary(stats: Stats, backend, opts: RunOptions, abandoned: int, stopped: bool) -> dict:
    el = stats.elapsed()
    tps = stats.completion_tokens() / el
    b = backend.stats()
    out = {"target": stats.target, "skipped": stats.skipped, "completed": stats.done, "rejected": stats.rejected,
           "retried_turns": stats.retried, "retry_reasons": dict(stats.retry_reasons), "abandoned": abandoned,
           "teacher_failures": stats.failed,
           "stopped": stopped, "seconds": round(el, 3), "completion_tokens": stats.completion_tokens(),
           "prompt_tokens": stats.prompt_tokens, "tokens_per_s": round(tps, 2),
           "tokens_per_s_by_turn": {t: round(n / el, 2) for t, n in stats.tokens.items()},
           "peak_in_flight": stats.peak_in_flight,
           "backend": {"retries": dict(b.retries), "errors": dict(b.errors), "concurrency": b.concurrency}}
    if opts.ceiling_tps:
        out["ceiling_tokens_per_s"] = opts.ceiling_tps
        out["efficiency"] = round(tps / opts.ceiling_tps, 4)
    return out
