"""Continuous batching for Tanuki and Tanuki-vision on megatron-core's ``DynamicInferenceEngine``.

megatron-core 0.19's dynamic engine does the hard parts -- a paged KV cache, continuous batching
(new requests are prefilled in the same forward as running decodes), chunked prefill, eviction
when the cache is full, TP/PP/EP -- and this module fits it to our models and users:

* the attention kernel it needs is installed by ``attention_backend`` (no flash-attn here);
* sampling is per-request reproducible (``sampling.SeededSampling``);
* stop *strings* cut the text exactly (megatron-core matches token sequences only);
* Tanuki-vision: megatron-core's dynamic path has no images. Each image of a request gets a slot;
  its placeholder positions carry marker ids ``IMAGE_MARK + slot * 2**20 + k`` as prompt tokens.
  At every forward the first pipeline stage embeds the real tokens, runs tower + S2 + projector
  once over all new images of the step (batched), and writes the features over the marked
  positions -- wherever the request's prefill chunk or re-prefill after eviction falls.
* requests that can never fit (prompt longer than the context, more KV blocks than the cache) are
  answered with an error, never queued forever.

Every rank of a model-parallel group must submit the same requests in the same order and call
:meth:`Engine.step` together (``generate.py`` does: each rank reads the same input).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from megatron_tanuki.inference import attention_backend
from megatron_tanuki.inference.sampling import SeededSampling, request_seed

IMAGE_MARK = 1 << 40     # marker ids for image positions: IMAGE_MARK + slot * 2**20 + k
_SLOT_SPAN = 1 << 20


class RequestError(ValueError):
    """A request that cannot be served (answered with an error record, the run goes on)."""


@dataclass
class EngineOptions:
    max_sequence_length: int = 4096      # prompt + completion, per request
    kv_memory_gb: float | None = None    # None: kv_memory_fraction of free GPU memory, 1 GB on CPU
    kv_memory_fraction: float = 0.5
    max_requests: int | None = None      # in flight at once (default: what the cache and budget allow)
    max_tokens: int = 8192               # tokens per forward (prefill budget); a multiple of 64
    block_size: int = 256
    chunked_prefill: bool = True
    seed: int = 0
    prompt_logprobs: bool = False        # materialize every position's logits (scoring)


@dataclass
class SamplingOptions:
    max_tokens: int = 512
    temperature: float = 1.0             # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0                # the n most likely tokens (text -> log-prob) at each position
    seed: int | None = None              # overrides the run seed for this request
    score_tokens: tuple[int, ...] = ()   # record P(token) at the prompt's end (no generation)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


@dataclass
class Completion:
    """One finished request. ``tokens``: what the model generated -- through the token that completed
    a stop string (the tokens were computed and are billed, as OpenAI-style servers count them), without
    the EOS it stopped at; ``text``: cut just before the first stop string."""

    key: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"        # "stop" | "length" | "error"
    prompt_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[dict] | None = None
    request_id: int = -1                 # the engine's id (submit's return value); -1: never submitted
    prompt_logprobs: list[float] | None = None
    scores: list[float] | None = None
    error: str | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class _ControllerTokenizer:
    """What megatron-core's controller asks of a tokenizer (we pass ids, never strings)."""

    def __init__(self, tok):
        self._tok = tok
        self.eod = tok.eos_id
        self.bos = tok.bos_id
        self.vocab_size = tok.vocab_size
        try:
            self._anchor = tok.encode("a")[-1]
        except (TypeError, ValueError, IndexError):  # a token-id-only tokenizer (the benchmarks')
            self._anchor = None

    def tokenize(self, text):
        return self._tok.encode(text)

    def detokenize(self, ids, **_):
        ids = [int(i) for i in ids if 0 <= int(i) < IMAGE_MARK]
        if len(ids) == 1 and self._anchor is not None:  # one token (megatron-core's top-n log-prob
            # keys): as it reads after other text, so SentencePiece's word-start space stays
            # ("▁the" -> " the", not "the" like "the")
            anchor = self._tok.decode([self._anchor])
            return self._tok.decode([self._anchor, ids[0]])[len(anchor):]
        return self._tok.decode(ids)

    def offsets(self, ids, text):  # pragma: no cover - megatron's segments option, unused
        return list(range(len(ids)))


class _ImageSlots:
    """Pixels of in-flight images by slot, their features computed at first use (first stage)."""

    def __init__(self, vision_model):
        self.vision = vision_model
        self.pixels: dict[int, torch.Tensor] = {}
        self.features: dict[int, torch.Tensor] = {}
        self.next_slot = 0
        self.images_encoded = 0

    def add(self, pixels: torch.Tensor) -> int:
        slot = self.next_slot
        self.next_slot += 1
        self.pixels[slot] = pixels
        return slot

    def release(self, slots) -> None:
        for s in slots:
            self.pixels.pop(s, None)
            self.features.pop(s, None)

    def embed(self, embedding, tokens, position_ids, live_tokens: int):
        """Token embeddings ``[T, 1, h]`` with image features over the marked positions."""
        ids = tokens[0]
        marked = ids >= IMAGE_MARK
        emb = embedding(input_ids=ids.masked_fill(marked, 0)[None], position_ids=position_ids)
        marked[live_tokens:] = False  # padding rows may hold stale markers of finished requests
        if not bool(marked.any()):
            return emb
        rows = marked.nonzero().flatten()
        codes = ids[rows] - IMAGE_MARK
        slots, offsets = codes // _SLOT_SPAN, codes % _SLOT_SPAN
        self._encode(sorted(set(slots.tolist())), emb.device)
        emb = emb.clone()
        for s in sorted(set(slots.tolist())):  # one gather per image, not one per position
            here = slots == s
            emb[rows[here], 0] = self.features[s][offsets[here]].to(emb.dtype)
        return emb

    def _encode(self, slots, device) -> None:
        todo = [s for s in slots if s not in self.features]
        if not todo:
            return
        dtype = next(self.vision.vision_model.parameters()).dtype  # a bf16 tower takes bf16 pixels
        pixels = torch.stack([self.pixels[s] for s in todo]).to(device=device, dtype=dtype)
        with torch.no_grad():
            feats = self.vision.image_features(pixels)
        for s, f in zip(todo, feats):
            self.features[s] = f
            self.pixels.pop(s, None)
        self.images_encoded += len(todo)


def _wrapper_class():
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    class TanukiInferenceWrapper(GPTInferenceWrapper):
        """megatron-core's GPT wrapper; for Tanuki-vision the first stage builds the decoder input
        with image features (``_ImageSlots.embed``)."""

        def __init__(self, language_model, context, images: _ImageSlots | None):
            super().__init__(language_model, context)
            self.images = images

        def _forward(self, inference_input):
            tokens, position_ids = inference_input["tokens"], inference_input["position_ids"]
            model = self.model
            decoder_input = None
            if self.images is not None and model.pre_process:
                live = self.inference_context.active_token_count
                decoder_input = self.images.embed(model.embedding, tokens, position_ids, live)
                if model.config.sequence_parallel:  # TanukiVisionModel turned the embedding's own
                    # scatter off (features are written first); the decoder wants its sequence shard
                    from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

                    decoder_input = scatter_to_sequence_parallel_region(decoder_input)
                tokens = tokens.clamp_max(IMAGE_MARK - 1) % model.vocab_size
            return model(tokens, position_ids, None, decoder_input=decoder_input,
                         inference_context=self.inference_context, runtime_gather_output=True)

    return TanukiInferenceWrapper


def _world_min(value: float) -> float:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def kv_bytes_per_token(language_model) -> int:
    """Bytes of K and V for one token over this rank's layers."""
    cfg = language_model.config
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    groups = max(1, (cfg.num_query_groups or cfg.num_attention_heads) // tp)
    head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    layers = len(language_model.decoder.layers)
    dtype_bytes = torch.finfo(cfg.params_dtype).bits // 8
    return 2 * layers * groups * head_dim * dtype_bytes


def kv_memory_gb(options: EngineOptions) -> float:
    if options.kv_memory_gb is not None:
        return float(options.kv_memory_gb)
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return options.kv_memory_fraction * free / 1024 ** 3
    return 1.0


class Engine:
    """Our requests on megatron-core's dynamic engine. ``chunks``: the built model (one chunk per
    process: the dynamic engine has no virtual pipeline); ``tokenizer``: a TanukiTokenizer or
    HFTokenizer; ``vocab_limit``: real token rows (the tokenizer's size)."""

    def __init__(self, chunks, tokenizer, options: EngineOptions | None = None, vocab_limit: int | None = None,
                 log=print):
        from megatron.core.inference.config import InferenceConfig
        from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
        from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController)

        if len(chunks) != 1:
            raise ValueError("the inference engine runs one model chunk per process (no virtual pipeline)")
        self.options = options = options or EngineOptions()
        if options.max_tokens % 64:
            raise ValueError(f"max_tokens {options.max_tokens}: must be a multiple of 64 (megatron-core pads "
                             "prefill to 64 tokens)")
        self.backend = attention_backend.install()
        model = chunks[0].eval()
        self.vision = model if hasattr(model, "image_features") else None
        self.language_model = model.language_model if self.vision is not None else model
        self.tok = tokenizer
        self.images = _ImageSlots(self.vision) if self.vision is not None and self.vision.pre_process else None
        self.num_image_tokens = self.vision.cfg.num_image_tokens if self.vision is not None else 0

        # Every rank must size the cache alike (free memory differs between GPUs; pipeline stages hold
        # different layers): a request one rank admits and another pauses would desynchronize the
        # collectives. megatron-core reconciles block counts over PP only; we take the minimum
        # over the world of the budget and of the request limit.
        gb = _world_min(kv_memory_gb(options))
        per_token = kv_bytes_per_token(self.language_model)
        self.kv_gb = gb
        cfg = InferenceConfig(
            max_sequence_length=options.max_sequence_length, buffer_size_gb=gb,
            block_size_tokens=options.block_size, max_tokens=options.max_tokens,
            max_requests=int(_world_min(self._max_requests(gb, per_token))), enable_chunked_prefill=options.chunked_prefill,
            materialize_only_last_token_logits=not options.prompt_logprobs,
            offset_sampling_seed_by_dp_rank=False, logprobs_mode="processed_logprobs")
        # Our MoE layers keep the training (all-to-all) dispatcher and the Tanuki router: megatron-core's
        # 'nvls'/'nccl' inference dispatchers belong to its inference_optimized MoE. Left at its default
        # ('nvls'), the context would allocate NVLink symmetric-memory buffers for EP > 1 (and fail
        # on CPU or without NVLink).
        self.language_model.config.inference_moe_token_dispatcher_type = "training-alltoall"
        self.context = DynamicInferenceContext(self.language_model.config, cfg)
        wrapper = _wrapper_class()(self.language_model, self.context, self.images)
        self.controller = TextGenerationController(wrapper, _ControllerTokenizer(tokenizer))
        self.sampling = SeededSampling(vocab_limit or tokenizer.vocab_size)
        self.controller._sampling = self.sampling
        self.engine = DynamicInferenceEngine(self.controller, self.context)
        # megatron-core allocates the paged cache with torch.empty. Slots no request has written are
        # never attended to, but a kernel reading whole pages (paged SDPA) weighs them by exactly 0,
        # and 0 * NaN-garbage is NaN: zeroed, stale memory cannot reach any output.
        if getattr(self.context, "memory_buffer", None) is not None:
            self.context.memory_buffer.zero_()
        self.blocks = self.context.kv_block_allocator.total_count - 1
        self._next_id = 0
        self._next_slot = 0
        self._live: dict[int, dict] = {}      # megatron request id -> our bookkeeping
        self.steps = 0
        self.trace: list[tuple[int, list[str]]] = []   # (step, keys in that step's batch) when tracing
        self.tracing = False
        log(f"[tanuki] KV cache: {gb:.3g} GB = {self.blocks} blocks of {options.block_size} tokens "
            f"({per_token} bytes/token on this rank), up to {self.context.max_requests} requests in flight, "
            f"{options.max_tokens} tokens per forward")

    def _max_requests(self, gb: float, per_token: int) -> int:
        from megatron.core import parallel_state

        blocks = int(gb * 1024 ** 3 // (per_token * self.options.block_size)) - 1
        cap = max(1, min(blocks, self.options.max_requests or 1024, self.options.max_tokens))
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return max(tp, cap // tp * tp)

    # -- requests -----------------------------------------------------------------------------
    def prompt_with_images(self, ids: list[int], images: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """``ids`` with unexpanded IMAGE_TOKEN_IDs -> engine tokens with marker ids, and the slots."""
        from megatron_tanuki.data.templates import IMAGE_TOKEN_ID

        n_marks = sum(1 for i in ids if i == IMAGE_TOKEN_ID)
        if n_marks != len(images):
            raise RequestError(f"the prompt has {n_marks} <image> placeholder(s) but {len(images)} image(s)")
        if images and self.vision is None:
            raise RequestError("this model has no vision tower; the request has an image")
        out, slots = [], []
        for i in ids:
            if i != IMAGE_TOKEN_ID:
                out.append(i)
                continue
            # every stage numbers slots alike (prompt tokens agree across ranks); only the first
            # stage keeps pixels
            slot = self.images.add(images[len(slots)]) if self.images is not None else self._next_slot
            self._next_slot = slot + 1
            slots.append(slot)
            out.extend(IMAGE_MARK + slot * _SLOT_SPAN + k for k in range(self.num_image_tokens))
        return out, (slots if self.images is not None else [])

    def submit(self, key: str, prompt: list[int], sampling: SamplingOptions,
               images: list[torch.Tensor] | None = None) -> int:
        """Queue a request; raises RequestError when it can never be served.

        Everything megatron-core would refuse at ``add_request`` is refused here first, with a message
        naming the option to change: a request megatron fails itself comes back only from a later step,
        and a caller that stopped stepping (``has_work()`` false) would never see it."""
        from megatron.core.inference.sampling_params import SamplingParams

        _check_sampling(sampling)
        tokens, slots = self.prompt_with_images(prompt, images or [])
        limit = self.options.max_sequence_length
        if len(tokens) >= limit:
            self._release(slots)
            raise RequestError(f"the prompt has {len(tokens)} tokens; the context holds {limit} "
                               "(prompt + completion, --max-seq-len)")
        if not self.options.chunked_prefill and len(tokens) > self.options.max_tokens:
            self._release(slots)
            raise RequestError(f"the prompt has {len(tokens)} tokens; one forward takes {self.options.max_tokens} "
                               "without chunked prefill")
        want = 1 if sampling.score_tokens else max(1, int(sampling.max_tokens))
        want = min(want, limit - len(tokens))
        need = math.ceil((len(tokens) + want) / self.options.block_size)
        if need > self.blocks:
            self._release(slots)
            raise RequestError(f"needs {need} KV blocks ({len(tokens)} + {want} tokens); the cache has "
                               f"{self.blocks} (raise --kv-memory-gb)")
        rid = self._next_id
        self._next_id += 1
        greedy = sampling.greedy or bool(sampling.score_tokens)
        params = SamplingParams(
            temperature=1.0 if greedy else float(sampling.temperature), top_k=1 if greedy else int(sampling.top_k),
            top_p=0.0 if greedy or sampling.top_p >= 1 else float(sampling.top_p),
            num_tokens_to_generate=want, termination_id=self.tok.eos_id,
            return_log_probs=bool(sampling.logprobs or sampling.top_logprobs or self.options.prompt_logprobs),
            top_n_logprobs=int(sampling.top_logprobs),
            skip_prompt_log_probs=not self.options.prompt_logprobs)
        self.sampling.seeds[rid] = request_seed(self.options.seed if sampling.seed is None else sampling.seed, key)
        if sampling.score_tokens:
            self.sampling.scores[rid] = list(sampling.score_tokens)
        if self.options.prompt_logprobs:
            self.sampling.prompts[rid] = tokens
        self._live[rid] = {"key": key, "sampling": sampling, "slots": slots, "prompt_tokens": len(tokens),
                           "stop_at": None}
        self.engine.add_request(rid, tokens, params)
        return rid

    def _release(self, slots) -> None:
        if self.images is not None:
            self.images.release(slots)

    @property
    def in_flight(self) -> int:
        return len(self._live)

    def kv_usage(self) -> float:
        alloc = self.context.kv_block_allocator
        free = getattr(alloc, "total_avail", None)
        if free is None:
            return float("nan")
        return 1.0 - free / max(1, self.blocks)

    # -- stepping -----------------------------------------------------------------------------
    def step(self) -> list[Completion]:
        """One engine step (every rank together); returns the requests that finished in it.

        Re-enters megatron-core's inference mode first: after :meth:`close` (for a plain forward in
        between) the model would otherwise take its training path on the engine's packed batch."""
        from megatron.core.inference.utils import InferenceMode

        InferenceMode.set_active()
        result = self.engine.step_modern()
        self.steps += 1
        # megatron-core consumes a stop request whether or not it could act on it (a request in its
        # chunked prefill is forced active again): a cancelled request stays asked until it finishes
        cancelled = [rid for rid, live in self._live.items() if live.get("cancelled")]
        self.engine.stop_word_finished_request_ids.update(cancelled)
        if self.tracing:
            ids = [int(i) for i in result.get("active_request_ids", [])]
            ids += [r.request_id for r in result["finished_request_records"]]
            self.trace.append((self.steps, sorted(self._live[i]["key"] for i in ids if i in self._live)))
        done = [self._finish(rec.merge()) for rec in result["finished_request_records"]]
        self._check_stop_strings()
        return done

    def _check_stop_strings(self) -> None:
        stopping = self.engine.stop_word_finished_request_ids
        for rid, live in self._live.items():
            stops = live["sampling"].stop
            if not stops or live["stop_at"] is not None or rid not in self.engine.requests:
                continue
            gen = self._generated(rid)
            tail = gen[-(4 * max(len(s) for s in stops) + 8):]  # a new stop string ends in the tail
            if not any(s and s in self.tok.decode(tail) for s in stops):
                continue
            cut = _stop_cut(self.tok, gen, stops)
            if cut is not None:
                live["stop_at"] = cut
                stopping.add(rid)

    def _generated(self, rid: int) -> list[int]:
        """All tokens a live request generated. After an eviction megatron-core checkpoints the
        request (prompt += generated, a new record entry) and ``get_request`` holds only the tokens
        since then; the stop-string cut counts from the first generated token."""
        return [int(t) for r in self.engine.requests[rid].record.requests for t in r.generated_tokens]

    def generated(self, rid: int) -> list[int]:
        """Tokens a live request has generated so far (streaming); [] before its first token."""
        return self._generated(rid) if rid in self._live and rid in self.engine.requests else []

    def cancel(self, rid: int) -> bool:
        """Stop a live request (a client went away) and free its KV blocks; call on every rank alike.
        A request still waiting is dropped now (True); a running one finishes at the next step, its
        Completion has ``finish_reason`` "cancelled" (False). Unknown ids are ignored."""
        live = self._live.get(rid)
        if live is None:
            return False
        waiting = self.engine.waiting_request_ids
        if rid in waiting and rid != getattr(self.context, "chunked_prefill_request_id", None):
            waiting.remove(rid)
            self.engine.requests.pop(rid, None)
            self._live.pop(rid)
            self._release(live["slots"])
            for table in (self.sampling.seeds, self.sampling.scores, self.sampling.prompts, self.sampling.recorded):
                table.pop(rid, None)
            return True
        live["cancelled"] = True
        self.engine.stop_word_finished_request_ids.add(rid)
        return False

    def _finish(self, req) -> Completion:
        live = self._live.pop(req.request_id)
        self._release(live["slots"])
        self.sampling.seeds.pop(req.request_id, None)
        self.sampling.scores.pop(req.request_id, None)
        self.sampling.prompts.pop(req.request_id, None)
        recorded = self.sampling.recorded.pop(req.request_id, None)
        sampling: SamplingOptions = live["sampling"]
        out = Completion(key=live["key"], prompt_tokens=live["prompt_tokens"], request_id=req.request_id)
        if live.get("cancelled"):
            out.finish_reason, out.tokens = "cancelled", [int(t) for t in req.generated_tokens]
            return out
        if getattr(req.status, "name", "") == "FAILED":
            out.finish_reason, out.error = "error", _failure(req)
            return out
        tokens = [int(t) for t in req.generated_tokens]
        logprobs = list(req.generated_log_probs or []) if sampling.logprobs or sampling.top_logprobs else None
        if sampling.score_tokens:
            out.scores = recorded
            out.finish_reason = "stop"
            tokens = []
        elif live["stop_at"] is not None:
            n_tokens, text = live["stop_at"]
            tokens, out.text, out.finish_reason = tokens[:n_tokens], text, "stop"
        elif tokens and tokens[-1] == self.tok.eos_id:
            tokens, out.finish_reason = tokens[:-1], "stop"
        else:
            stop = _stop_cut(self.tok, tokens, sampling.stop) if sampling.stop else None
            if stop is not None:  # the stop string completed on the last token
                tokens, out.text, out.finish_reason = tokens[:stop[0]], stop[1], "stop"
        out.tokens = tokens
        if not out.text and tokens:
            out.text = self.tok.decode(tokens)
        if logprobs is not None:
            out.logprobs = logprobs[:len(tokens)]
        if sampling.top_logprobs:
            out.top_logprobs = list(req.generated_top_n_logprobs or [])[:len(tokens)]
        if self.options.prompt_logprobs:
            out.prompt_logprobs = list(req.prompt_log_probs or [])
        return out

    def close(self) -> None:
        """Leave megatron-core's process-wide inference mode (set when the engine is built), after
        which a plain ``model(...)`` call (training, ``forward_logits``) works again."""
        from megatron.core.inference.utils import InferenceMode

        InferenceMode.unset_active()

    def has_work(self) -> bool:
        """Something to step for: running or waiting requests, or failed ones megatron-core returns
        only from its next step's bookkeeping."""
        return self.engine.has_unfinished_requests() or bool(self.engine.failed_request_ids)

    def run(self, requests, max_waiting: int | None = None):
        """Feed ``requests`` (iterable of (key, prompt ids, SamplingOptions, images)) and step until
        all finish; yields Completions as they finish (errors at submit included). Keeps at most
        ``max_waiting`` requests submitted at once (default: twice the in-flight limit; with images,
        the limit plus 32 -- a queued image holds its float32 pixels, 7 MB at 768 px, until its
        prefill encodes it)."""
        limit = self.context.max_requests
        cap = max_waiting or (limit + 32 if self.vision is not None else 2 * limit)
        it = iter(requests)
        exhausted = False
        while True:
            while not exhausted and self.in_flight < cap:
                try:
                    key, prompt, sampling, images = next(it)
                except StopIteration:
                    exhausted = True
                    break
                try:
                    self.submit(key, prompt, sampling, images)
                except RequestError as e:
                    yield Completion(key=key, finish_reason="error", error=str(e), prompt_tokens=len(prompt))
            if not self.has_work():
                if exhausted:
                    return
                continue
            yield from self.step()


def _failure(req) -> str:
    events = [e for e in getattr(req, "events", []) if "ERROR" in str(getattr(e, "type", ""))]
    if events:
        payload = getattr(events[-1], "payload", None)
        return f"{type(payload).__name__}: {payload}" if payload is not None else str(events[-1].type)
    return "the engine failed this request"


def _stop_cut(tok, tokens: list[int], stops) -> tuple[int, str] | None:
    """(n, text): the first ``n`` tokens are the shortest prefix whose text holds a stop string (the
    n-th token completed it) and ``text`` is that prefix's text cut before the first stop string.
    None while no stop string has appeared. A binary search: the prefix texts only grow."""
    stops = [s for s in stops if s]

    def first_hit(n: int) -> int | None:
        text = tok.decode(tokens[:n])
        hits = [text.find(s) for s in stops if s in text]
        return min(hits) if hits else None

    if not stops or first_hit(len(tokens)) is None:
        return None
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if first_hit(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    return lo, tok.decode(tokens[:lo])[:first_hit(lo)]


def _check_sampling(sampling: "SamplingOptions") -> None:
    """Sampling fields a request can never be served with (messages name the field)."""
    if not 0 < sampling.top_p <= 1:
        raise RequestError(f"top_p {sampling.top_p}: must be in (0, 1]")
    if sampling.temperature < 0:
        raise RequestError(f"temperature {sampling.temperature}: must be >= 0 (0 = greedy)")
    if sampling.top_k < 0:
        raise RequestError(f"top_k {sampling.top_k}: must be >= 0 (0 = off)")
    if sampling.top_k > 2 ** 31 - 1 or sampling.top_logprobs > 2 ** 31 - 1:  # megatron-core keeps them as int32
        raise RequestError("top_k and top_logprobs must be below 2^31")
    if any(len(s) > 1024 for s in sampling.stop):
        raise RequestError("a stop string longer than 1024 characters")
    if isinstance(sampling.stop, str):
        raise RequestError(f"stop {sampling.stop!r}: must be a list of strings, not one string")
