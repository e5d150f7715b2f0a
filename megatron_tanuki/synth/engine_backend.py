"""The in-process teacher: our continuous-batching engine behind the scheduler's backend surface.

``submit`` renders the chat messages with the teacher's template and queues the request in the
engine; ``poll`` runs one engine step (every rank of the model-parallel group together) and returns
the turns that finished in it. ``capacity`` keeps twice the engine's in-flight limit submitted, so a
finished request's slot is refilled in the same step. Sampling is seeded per request (the turn's
derived seed), so an answer does not depend on what else is in the batch.
"""
from __future__ import annotations

import time

from megatron_tanuki.synth.backend import BackendStats, TurnRequest, TurnResult


class EngineBackend:
    def __init__(self, engine, tok, template, max_in_flight: int | None = None, group=None, cfg=None):
        self.engine, self.tok, self.template, self.cfg = engine, tok, template, cfg
        self.limit = max_in_flight or 2 * engine.context.max_requests
        self.group = group          # the process group whose ranks must agree on stop flags
        self._immediate: list[TurnResult] = []
        self._started: dict[str, float] = {}
        self._stats = BackendStats(concurrency=self.limit)

    def submit(self, req: TurnRequest) -> None:
        from megatron_tanuki.data import templates
        from megatron_tanuki.inference.engine import RequestError, SamplingOptions

        from megatron_tanuki.data.images import ImageError

        turns = [(m["role"], m["content"]) for m in req.messages]
        try:
            images = self._images(req, turns)
            ids = templates.prompt_ids(self.tok, self.template, turns)
            opts = SamplingOptions(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                   stop=tuple(dict.fromkeys(tuple(req.stop) + self.template.stop)), seed=req.seed)
            self.engine.submit(req.key, ids, opts, images)
        except (RequestError, templates.ConversationError, ImageError, ValueError) as e:
            self._stats.errors["request"] = self._stats.errors.get("request", 0) + 1
            self._immediate.append(TurnResult(req.key, finish_reason="error", error=str(e), error_kind="request"))
            return
        self._started[req.key] = time.monotonic()

    def _images(self, req: TurnRequest, turns: list) -> list:
        """Preprocessed pixels of the request's images; "<image>" put before the first user turn's text
        when the messages do not place it (as `tanuki generate` does)."""
        from megatron_tanuki.data import templates
        from megatron_tanuki.data.images import load_image, preprocess

        if not req.images:
            return []
        if self.cfg is None or not hasattr(self.cfg, "vision"):
            raise ValueError(f"{req.key}: the request has an image but the model has no vision tower")
        if not any(templates.IMAGE_MARK in t for _, t in turns):
            k = next(k for k, (r, _) in enumerate(turns) if r == "user")
            turns[k] = ("user", templates.IMAGE_MARK + "\n" + turns[k][1])
        return [preprocess(load_image(p, req.key), self.cfg.image_size) for p in req.images]

    def poll(self, timeout: float) -> list[TurnResult]:
        out, self._immediate = self._immediate, []
        if self.engine.has_work():
            for c in self.engine.step():
                t0 = self._started.pop(c.key, time.monotonic())
                if c.error is not None:
                    self._stats.errors["engine"] = self._stats.errors.get("engine", 0) + 1
                out.append(TurnResult(c.key, text=c.text, finish_reason=c.finish_reason, error=c.error,
                                      error_kind="engine" if c.error else None, prompt_tokens=c.prompt_tokens,
                                      completion_tokens=c.completion_tokens, latency_s=time.monotonic() - t0))
        return out

    def capacity(self) -> int:
        return self.limit - self.engine.in_flight

    def in_flight(self) -> int:
        return self.engine.in_flight

    def stats(self) -> BackendStats:
        return self._stats

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Every rank ends, stops or continues together: the flags are OR-ed over the group."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size(self.group) == 1:
            return flags
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"  # NCCL
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return tuple(bool(x) for x in t.tolist())

    def close(self) -> None:
        self.engine.close()

