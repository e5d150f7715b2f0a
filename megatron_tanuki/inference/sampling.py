"""Per-request reproducible sampling for megatron-core's dynamic engine.

megatron-core samples with one ``torch.Generator`` per process (offset by the DP rank): a request's
tokens then depend on which other requests shared its batches, and equal prompts started at the
same time get equal answers (the seed team's duplicate conversations). Here every random draw is a
pure function of (request seed, token position, vocabulary index): Gumbel-max sampling with noise
from a counter-based hash, so a request yields the same tokens alone or in a batch of 64, on any
rank, on CPU or GPU. The request seed is derived from the run seed and the request's id
(:func:`request_seed`).

:class:`SeededSampling` replaces the controller's ``_sampling`` (megatron-core's ``Sampling``
interface). It also cuts the padded vocabulary rows (never a real token) and, for scoring
requests, records the next-token probabilities of chosen ids (Ask-LLM's P("yes")).
"""
from __future__ import annotations

import hashlib

import torch
from megatron.core.inference.sampling.base import Sampling

_M64 = (1 << 64) - 1


def request_seed(run_seed: int, key: str) -> int:
    """A 62-bit seed from the run seed and a request id (stable across processes and Python runs)."""
    digest = hashlib.blake2b(f"{int(run_seed)}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _as_signed(x: int) -> int:
    x &= _M64
    return x - (1 << 64) if x >> 63 else x


_C1, _C2, _C3 = (_as_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finalizer on int64 tensors (wrapping multiply; logical shifts by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _C2
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _C3
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def gumbel_at(seeds: torch.Tensor, positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise of each (seed, position, vocabulary index) triple (int tensors that
    broadcast together): the same value wherever and with whatever else it is computed."""
    key = _mix(seeds.to(torch.int64) * _C1 + positions.to(torch.int64))
    x = _mix(key + index.to(torch.int64) * _C1)
    u = (((x >> 40) & ((1 << 24) - 1)).to(torch.float32) + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab: int, device) -> torch.Tensor:
    """[rows, vocab] Gumbel(0, 1) noise, a function of (seed, position, index) only."""
    return gumbel_at(seeds.to(device)[:, None], positions.to(device)[:, None],
                     torch.arange(vocab, device=device)[None, :])


def gumbel_max(filtered: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """argmax(filtered + Gumbel noise) per row: a draw from softmax(filtered). Noise is computed only
    where a token survived top-k/top-p (-inf elsewhere never wins), so a top-k 20 row costs 20 hashes,
    not 65024; the values are those of :func:`gumbel_noise`, so the draw is the same either way."""
    keep = torch.isfinite(filtered)
    if bool(keep.all()):
        return (filtered + gumbel_noise(seeds, positions, filtered.shape[-1], filtered.device)).argmax(-1)
    rows, cols = keep.nonzero(as_tuple=True)
    seeds, positions = seeds.to(filtered.device), positions.to(filtered.device)
    noisy = torch.full_like(filtered, float("-inf"))
    noisy[rows, cols] = filtered[rows, cols] + gumbel_at(seeds[rows], positions[rows], cols)
    return noisy.argmax(-1)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k, then top-p per row (0 = off for k, 0 or 1 = off for p)."""
    logits = logits / temperature[:, None]
    need_k, need_p = bool((top_k > 0).any()), bool(((top_p > 0) & (top_p < 1)).any())
    if not (need_k or need_p):
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = torch.zeros_like(ordered, dtype=torch.bool)
    if need_k:
        drop |= (top_k[:, None] > 0) & (rank >= top_k[:, None])
    if need_p:
        probs = ordered.masked_fill(drop, float("-inf")).softmax(-1)
        before = probs.cumsum(-1) - probs            # mass of the better tokens
        p = top_p[:, None]
        drop |= (p > 0) & (p < 1) & (before >= p)     # keep the smallest set reaching top_p
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


class SeededSampling(Sampling):
    """megatron-core ``Sampling`` with per-request seeds (see the module docstring).

    ``seeds``: megatron request id -> seed (the engine fills it at submit). ``scores``: request id
    -> token ids whose probabilities to record; results land in ``recorded`` (the last call for a
    request wins: its final prefill chunk)."""

    def __init__(self, vocab_limit: int):
        self.vocab_limit = int(vocab_limit)
        self.seeds: dict[int, int] = {}
        self.scores: dict[int, list[int]] = {}
        self.recorded: dict[int, list[float]] = {}
        self.prompts: dict[int, list[int]] = {}   # request id -> prompt, when prompt log-probs are asked

    def sample_kernel(self, logits, n, context, *, no_top_k=True, no_top_p=True, gather_indices=None,
                      token_to_request_index=None, output=None, eager=False, cache_key=None):
        if token_to_request_index is not None:
            raise NotImplementedError("speculative decoding is not supported by SeededSampling")
        if gather_indices is not None:
            logits = logits[gather_indices[:n]]
        logits = logits[:n].float()
        if logits.shape[-1] > self.vocab_limit:  # padded vocabulary rows are never tokens
            logits = logits.clone()
            logits[:, self.vocab_limit:] = float("-inf")
        first = context.paused_request_count
        ids = context.request_ids[first:first + n].tolist()
        positions = (context.request_kv_length_offsets[first:first + n]
                     + context.request_query_lengths[first:first + n]).long()
        md = context.active_request_metadata
        temperature = md["temperature"][:n].to(logits.device, torch.float32)
        top_k = md["top_k"][:n].to(logits.device, torch.int64)
        top_p = md["top_p"][:n].to(logits.device, torch.float32)
        self._record_scores(ids, logits)
        greedy = (top_k == 1) | (temperature <= 0)
        tokens = logits.argmax(-1)
        if not bool(greedy.all()):  # only the sampled rows are filtered and get noise
            rows = (~greedy).nonzero().flatten()
            seeds = torch.tensor([self.seeds.get(ids[r], ids[r]) for r in rows.tolist()], dtype=torch.int64)
            filtered = filter_logits(logits[rows], temperature[rows], top_k[rows], top_p[rows])
            tokens[rows] = gumbel_max(filtered, seeds, positions[rows.cpu()])
        self._next_prompt_token(context, ids, positions, tokens)
        if output is None:
            return tokens
        output[:n].copy_(tokens)
        return output

    def _next_prompt_token(self, context, ids, positions, tokens) -> None:
        """A request whose prefill continues in a later chunk gets its next *prompt* token as its
        "sample". megatron-core throws that token away, but its prompt log-probs take the token after
        the chunk's last position from this sample (``calculate_log_probs_tensors``), so without this
        every chunk boundary scored a random token instead of the prompt's."""
        chunked = int(getattr(context, "chunked_prefill_request_id", -1))
        prompt = self.prompts.get(chunked)
        if prompt is None or chunked not in ids:
            return
        row = ids.index(chunked)
        nxt = int(positions[row])
        if nxt < len(prompt):
            token = int(prompt[nxt])
            tokens[row] = token if 0 <= token < self.vocab_limit else 0  # an image marker: any real id

    def _record_scores(self, ids, logits) -> None:
        for row, rid in enumerate(ids):
            wanted = self.scores.get(rid)
            if wanted:
                probs = logits[row].softmax(-1)
                self.recorded[rid] = probs[torch.tensor(wanted, device=logits.device)].tolist()

    def log_probs_kernel(self, logits, context, *, token_to_request_index=None):
        """Log-probabilities of the model's distribution over the real tokens (the padded vocabulary
        rows cut, as for sampling and scores; no temperature or top-k/top-p): the engine selects this
        with ``logprobs_mode="processed_logprobs"``, since megatron-core's raw mode would normalize
        over the padded rows too."""
        logits = logits.float()
        if logits.shape[-1] > self.vocab_limit:
            logits = logits.clone()
            logits[..., self.vocab_limit:] = float("-inf")
        return torch.log_softmax(logits, dim=-1)
