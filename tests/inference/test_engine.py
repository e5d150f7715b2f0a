"""The engine's own behaviour on one CPU process: continuous batching, per-request seeds, stop strings,
finish reasons, KV-cache limits and scores.

A tiny Tanuki (random init, fp32, built in-process) and the real Tanuki tokenizer. Token *values* of a
random model mean nothing; the tests compare runs with each other (alone vs in a batch, big vs small
cache, with vs without a stop string) and with megatron-core's uncached full-recompute logits
(``forward_logits`` after ``engine.close()``), so every assertion is exact.
"""
import math

import pytest
import torch

from megatron_tanuki.inference import sampling as smp

ENGINE = dict(max_sequence_length=512, kv_memory_gb=0.02, block_size=64, max_tokens=256)
BLOCK_BYTES = 64 * 1024          # one 64-token block of tanuki-8b-tiny fp32 K+V (1024 bytes/token)


@pytest.fixture(scope="module")
def model(single_process):
    """(chunks, tokenizer, vocab limit); leaves megatron-core's inference mode off for later modules.

    One intra-op thread while this module runs: the tiny model's matmuls are far too small to gain
    from threads, and on a loaded 2-core machine two spinning OpenMP threads made each step ~100x
    slower (measured). Restored afterwards."""
    from megatron.core.inference.utils import InferenceMode

    from megatron_tanuki.data.tokenizer import TanukiTokenizer
    from megatron_tanuki.runtime.distributed import set_seeds

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    set_seeds(7)  # the same weights whatever ran before in this process
    tok = TanukiTokenizer()
    yield _build("tanuki-8b-tiny"), tok, tok.vocab_size
    InferenceMode.unset_active()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def moe_model(model):
    """The tiny 8-expert Tanuki (TanukiRouter) beside the dense one."""
    from megatron_tanuki.runtime.distributed import set_seeds

    set_seeds(8)
    return _build("tanuki-8x8b-tiny"), model[1], model[2]


def _build(preset):
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.runtime.distributed import ParallelLayout

    chunks = registry.build(registry.get_preset(preset), ParallelLayout(), BuildOptions(dtype="fp32"))
    for c in chunks:
        c.eval()
    return chunks


def engine(model, **kw):
    from megatron_tanuki.inference.engine import Engine, EngineOptions

    chunks, tok, limit = model
    return Engine(chunks, tok, EngineOptions(**{**ENGINE, **kw}), vocab_limit=limit, log=lambda *_: None)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 60000, (n,), generator=g).tolist() for n in lengths]


def run(eng, requests) -> dict:
    """key -> Completion for (key, prompt, SamplingOptions) requests, all submitted up front."""
    return {c.key: c for c in eng.run([(k, p, s, None) for k, p, s in requests])}


def recompute_logits(model, ids):
    """Last-position logits of ``ids`` by uncached full recompute, real-token columns only."""
    from megatron_tanuki.inference.logits import forward_logits

    chunks, _, limit = model
    return forward_logits(chunks, torch.tensor([ids]), last_only=True)[0, :limit]


# ------------------------------------------------------------------ sampling units (no model)

def test_request_seed_is_stable_and_keyed():
    assert smp.request_seed(0, "a") == smp.request_seed(0, "a") == 3817620596036335109
    assert len({smp.request_seed(0, "a"), smp.request_seed(0, "b"), smp.request_seed(1, "a")}) == 3
    assert 0 <= smp.request_seed(123, "x" * 1000) < 2 ** 62


def test_filter_logits_keep_sets():
    probs = torch.tensor([0.10, 0.50, 0.25, 0.15])
    row = probs.log()
    rows = row.expand(7, 4).clone()
    temperature = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    top_k = torch.tensor([2, 0, 0, 0, 3, 3, 0])
    top_p = torch.tensor([0.0, 0.3, 0.7, 0.8, 0.9, 0.8, 1.0])
    out = smp.filter_logits(rows, temperature, top_k, top_p)
    kept = [set(torch.isfinite(r).nonzero().flatten().tolist()) for r in out]
    assert kept == [
        {1, 2},           # top-k 2
        {1},              # top-p 0.3: 0.5 alone reaches it
        {1, 2},           # top-p 0.7: 0.5 + 0.25
        {1, 2, 3},        # top-p 0.8: 0.5 + 0.25 = 0.75 < 0.8, so 0.15 joins
        {1, 2, 3},        # top-k 3, then top-p 0.9 of the renormalized 0.556/0.278/0.167
        {1, 2},           # top-k 3, then top-p 0.8: 0.556 + 0.278 = 0.833 reaches it (renormalized)
        {0, 1, 2, 3},     # off
    ]
    assert torch.equal(out[0][[1, 2]], row[[1, 2]])
    assert torch.allclose(out[6], row / 2)


def test_gumbel_noise_is_a_function_of_seed_position_index():
    seeds, positions = torch.tensor([5, 9, 5, 5]), torch.tensor([3, 3, 4, 3])
    batch = smp.gumbel_noise(seeds, positions, 100, "cpu")
    for i in range(4):  # each row alone, and with a narrower vocabulary
        assert torch.equal(smp.gumbel_noise(seeds[i:i + 1], positions[i:i + 1], 100, "cpu")[0], batch[i])
        assert torch.equal(smp.gumbel_noise(seeds[i:i + 1], positions[i:i + 1], 40, "cpu")[0], batch[i, :40])
    assert torch.equal(batch[0], batch[3])
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[0], batch[2])
    assert batch.isfinite().all()
    # Gumbel-max over the tokens top-k/top-p kept: the noise of those entries only, same draw
    logits = torch.randn(4, 100).masked_fill(torch.rand(4, 100) < 0.7, float("-inf"))
    logits[1] = torch.randn(100)  # a row nothing was cut from
    assert torch.equal(smp.gumbel_max(logits, seeds, positions), (logits + batch).argmax(-1))


def test_gumbel_max_frequencies_match_softmax():
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0])
    n = 20000
    # one request over its positions, as the engine draws it
    noise = smp.gumbel_noise(torch.full((n,), 42), torch.arange(n), 4, "cpu")
    freq = torch.bincount((logits + noise).argmax(-1), minlength=4).float() / n
    assert (freq - logits.softmax(-1)).abs().max().item() < 0.02, freq


# ------------------------------------------------------------------ continuous batching

def test_continuous_batching_joins_running_batch_and_beats_static(model):
    """4 requests in flight at most; 4 more submitted after 3 steps. Each late one is prefilled in a
    step that also decodes an earlier one (from ``engine.trace``), and the run takes fewer steps than
    static batches of 4 (each runs to its longest member, one step per token: 32 + 30)."""
    from megatron_tanuki.inference.engine import SamplingOptions

    eng = engine(model, max_requests=4)  # 4 in flight; the rest wait for a free slot
    eng.tracing = True
    lengths = [32, 3, 6, 8, 30, 5, 7, 28]
    reqs = [(f"r{i}", p, SamplingOptions(max_tokens=n, temperature=0.8, seed=3))
            for i, (p, n) in enumerate(zip(prompts([5, 9, 13, 17, 7, 11, 15, 19]), lengths))]
    done = {}
    for key, p, s in reqs[:4]:
        eng.submit(key, p, s)
    for _ in range(3):
        done.update((c.key, c) for c in eng.step())
    for key, p, s in reqs[4:]:  # while the first four decode
        eng.submit(key, p, s)
    while eng.has_work():
        done.update((c.key, c) for c in eng.step())

    assert {k: (c.finish_reason, c.completion_tokens) for k, c in done.items()} == {
        f"r{i}": ("length", n) for i, n in enumerate(lengths)}  # no EOS cut anything short
    first_seen = {}
    for step, keys in eng.trace:
        for k in keys:
            first_seen.setdefault(k, step)
    mixed = [(step, keys) for step, keys in eng.trace
             if any(first_seen[k] < step for k in keys) and any(first_seen[k] == step for k in keys)]
    late = {f"r{i}" for i in range(4, 8)}
    # every late request was prefilled in a forward that also decoded an earlier one
    assert late <= {k for step, keys in mixed for k in keys if first_seen[k] == step}, eng.trace
    static = sum(max(lengths[i:i + 4]) for i in range(0, len(lengths), 4))  # 32 + 30 steps
    assert eng.steps < static, (eng.steps, static)
    assert eng.steps <= 40


# ------------------------------------------------------------------ per-request reproducibility

@pytest.mark.parametrize("which", ["model", "moe_model"])
def test_sampled_request_same_alone_and_in_a_batch_of_64(which, request):
    from megatron_tanuki.inference.engine import SamplingOptions

    model = request.getfixturevalue(which)

    ps = prompts([3 + (7 * i) % 40 for i in range(64)], seed=1)
    top_p = SamplingOptions(max_tokens=8, temperature=0.8, top_p=0.9)
    top_k = SamplingOptions(max_tokens=8, temperature=0.8, top_k=20)
    others = [SamplingOptions(max_tokens=2 + i % 9, temperature=[0.0, 1.0, 0.5][i % 3], top_k=i % 4 * 10)
              for i in range(60)]
    batch = [("p", ps[0], top_p), ("k", ps[1], top_k), ("same-a", ps[2], top_p), ("same-b", ps[2], top_p)]
    batch += [(f"o{i}", ps[4 + i], s) for i, s in enumerate(others)]
    eng = engine(model)
    together = run(eng, batch)
    alone_p, alone_k = run(eng, batch[:1]), run(eng, batch[1:2])
    assert len(together) == 64 and all(c.finish_reason == "length" for c in together.values())
    assert together["p"].tokens == alone_p["p"].tokens and len(alone_p["p"].tokens) == 8
    assert together["k"].tokens == alone_k["k"].tokens and len(alone_k["k"].tokens) == 8
    assert together["same-a"].tokens != together["same-b"].tokens  # same prompt, other id

    again = run(engine(model), batch[:1])                 # a new engine, the same run seed
    other_seed = run(engine(model, seed=1), batch[:1])
    override = run(eng, [("p", ps[0], SamplingOptions(max_tokens=8, temperature=0.8, top_p=0.9, seed=1))])
    assert again["p"].tokens == alone_p["p"].tokens
    assert other_seed["p"].tokens != alone_p["p"].tokens
    assert override["p"].tokens == other_seed["p"].tokens   # a request's seed overrides the run seed


# ------------------------------------------------------------------ stop strings and finish reasons

def _first_completing(tok, tokens, stop):
    return next(n for n in range(1, len(tokens) + 1) if stop in tok.decode(tokens[:n]))


def test_stop_strings_cut_exactly(model):
    from megatron_tanuki.inference.engine import SamplingOptions

    tok = model[1]
    eng = engine(model)
    p = prompts([12], seed=2)[0]
    opts = dict(max_tokens=24, temperature=0.8, top_p=0.9)
    free = run(eng, [("s", p, SamplingOptions(**opts))])["s"]
    assert free.finish_reason == "length" and free.completion_tokens == 24
    text = free.text
    assert text == tok.decode(free.tokens)

    mid = len(tok.decode(free.tokens[:10]))
    completing = []
    for stop in (text[mid:mid + 3], text[-2:]):   # completes mid-way; completes on the last token
        at = text.find(stop)
        n = _first_completing(tok, free.tokens, stop)
        got = run(eng, [("s", p, SamplingOptions(**opts, stop=("never here", stop)))])["s"]
        assert (got.text, got.finish_reason) == (text[:at], "stop"), (stop, got)
        assert got.tokens == free.tokens[:n] and got.completion_tokens == n
        completing.append(n)
    assert completing[0] < 24 == completing[1] and mid > 0

    missing = run(eng, [("s", p, SamplingOptions(**opts, stop=("never here",)))])["s"]
    assert (missing.text, missing.finish_reason, missing.tokens) == (text, "length", free.tokens)


def test_eos_finishes_with_stop(model):
    """Make EOS the greedy choice by giving its output row the weights of the token chosen at step 3
    (tripled: that logit is the row's maximum, so positive); restored afterwards."""
    from megatron_tanuki.inference.engine import SamplingOptions

    chunks, tok, _ = model
    eos = tok.eos_id
    p = prompts([9], seed=4)[0]
    greedy = SamplingOptions(max_tokens=6, temperature=0)
    before = run(engine(model), [("g", p, greedy)])["g"]
    assert before.finish_reason == "length" and eos not in before.tokens
    m = chunks[0]
    weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else m.output_layer.weight
    saved = weight[eos].clone()
    try:
        with torch.no_grad():
            weight[eos] = 3 * weight[before.tokens[2]]
        eng = engine(model)
        got = run(eng, [("g", p, greedy)])["g"]
        eng.close()
        assert got.finish_reason == "stop" and len(got.tokens) <= 2
        assert got.tokens == before.tokens[:len(got.tokens)]   # EOS dropped, nothing else changed
        assert int(recompute_logits(model, p + got.tokens).argmax()) == eos
    finally:
        with torch.no_grad():
            weight[eos] = saved


# ------------------------------------------------------------------ KV cache limits

def test_requests_that_can_never_fit_are_errors(model):
    from megatron_tanuki.inference.engine import RequestError, SamplingOptions

    eng = engine(model, kv_memory_gb=5 * BLOCK_BYTES / 2 ** 30)  # 5 blocks, one is megatron's dummy
    assert eng.blocks == 4
    long_answer, too_long = prompts([200, 600], seed=5)
    with pytest.raises(RequestError) as e:
        eng.submit("big", long_answer, SamplingOptions(max_tokens=100))
    assert str(e.value) == "needs 5 KV blocks (200 + 100 tokens); the cache has 4 (raise --kv-memory-gb)"
    with pytest.raises(RequestError) as e:
        eng.submit("long", too_long, SamplingOptions(max_tokens=4))
    assert str(e.value) == ("the prompt has 600 tokens; the context holds 512 (prompt + completion, "
                            "--max-seq-len)")
    with pytest.raises(RequestError, match=r"^top_p 1.5: must be in \(0, 1\]$"):
        eng.submit("p", long_answer, SamplingOptions(top_p=1.5))
    assert not eng.has_work() and eng.in_flight == 0

    out = run(eng, [("big", long_answer, SamplingOptions(max_tokens=100)),
                    ("ok", long_answer, SamplingOptions(max_tokens=50, temperature=0)),
                    ("long", too_long, SamplingOptions(max_tokens=4))])
    assert {k: c.finish_reason for k, c in out.items()} == {"big": "error", "ok": "length", "long": "error"}
    assert out["big"].error.startswith("needs 5 KV blocks") and out["big"].prompt_tokens == 200
    assert out["long"].error.startswith("the prompt has 600 tokens") and out["ok"].completion_tokens == 50


def test_small_cache_pauses_and_evicts_yet_same_tokens(model):
    """5 blocks; each request alone needs 2, all six at once 12: megatron-core pauses requests and
    evicts some (re-prefilling prompt + tokens so far later). Every request still gets the tokens
    the big cache gives it; r5 also has a stop string that completes after its eviction (the cut
    counts from its first generated token, not from the eviction checkpoint)."""
    from megatron_tanuki.inference.engine import SamplingOptions

    tok = model[1]
    ps = prompts([50, 60, 40, 55, 62, 45], seed=6)
    opts = [SamplingOptions(max_tokens=40 + 5 * i, temperature=0.8, top_k=50) for i in range(6)]
    big = run(engine(model), [(f"r{i}", p, o) for i, (p, o) in enumerate(zip(ps, opts))])
    stop = big["r5"].text[len(tok.decode(big["r5"].tokens[:60])):][:2]
    n = _first_completing(tok, big["r5"].tokens, stop)
    opts[5] = SamplingOptions(max_tokens=65, temperature=0.8, top_k=50, stop=(stop,))

    eng = engine(model, kv_memory_gb=6 * BLOCK_BYTES / 2 ** 30)  # 6 blocks, one is megatron's dummy
    rids = [eng.submit(f"r{i}", p, o) for i, (p, o) in enumerate(zip(ps, opts))]
    small, generated_before_eviction = {}, {}
    while eng.has_work():
        small.update((c.key, c) for c in eng.step())
        for i, rid in enumerate(rids):
            if rid in eng.engine.requests and len(eng.engine.requests[rid].record.requests) > 1:
                generated_before_eviction[i] = len(eng.engine.requests[rid].record.requests[0].generated_tokens)
    assert eng.blocks == 5 and eng.engine.evicted_request_count >= 3 and 5 in generated_before_eviction
    for i in range(5):
        assert (small[f"r{i}"].tokens, small[f"r{i}"].finish_reason) == (big[f"r{i}"].tokens, "length"), i
    assert generated_before_eviction[5] < n < 65
    assert (small["r5"].tokens, small["r5"].finish_reason) == (big["r5"].tokens[:n], "stop")
    assert small["r5"].text == big["r5"].text[:big["r5"].text.find(stop)]


def test_never_written_cache_slots_never_reach_outputs(model):
    """The cache full of NaN before the first step: the same tokens. Requests of different lengths in
    one batch make a kernel that gathers whole pages see slots past each request's length."""
    from megatron_tanuki.inference.engine import SamplingOptions

    reqs = [(f"r{i}", p, SamplingOptions(max_tokens=3, temperature=0)) for i, p in enumerate(prompts([3, 40, 70]))]
    clean = run(engine(model), reqs)
    eng = engine(model)
    eng.context.memory_buffer.fill_(float("nan"))
    poisoned = run(eng, reqs)
    assert {k: c.tokens for k, c in poisoned.items()} == {k: c.tokens for k, c in clean.items()}


# ------------------------------------------------------------------ scores and log-probs

def test_scores_and_logprobs_equal_full_recompute(model):
    from megatron_tanuki.inference.engine import SamplingOptions

    ps = prompts([6, 17, 30], seed=8)
    ids = (1010, 2, 64999)
    eng = engine(model)
    scores = run(eng, [(f"s{i}", p, SamplingOptions(score_tokens=ids)) for i, p in enumerate(ps)])
    sampled = run(eng, [("lp", ps[1], SamplingOptions(max_tokens=3, temperature=0.8, logprobs=True))])["lp"]
    # --score with the prompt's log-likelihood: every position's logits, prompt long enough to chunk
    long_prompt = prompts([300], seed=9)[0]
    likelihood = run(engine(model, prompt_logprobs=True), [("ll", long_prompt, SamplingOptions(score_tokens=ids))])
    eng.close()
    for i, p in enumerate(ps):
        c = scores[f"s{i}"]
        assert (c.finish_reason, c.tokens, c.prompt_tokens) == ("stop", [], len(p))
        want = recompute_logits(model, p).softmax(-1)[list(ids)]
        # a random model's probabilities are ~1/65000: relative, not only the 1e-5 absolute bound
        assert torch.allclose(torch.tensor(c.scores), want, rtol=1e-4, atol=0), (c.scores, want)
    from megatron_tanuki.inference.logits import forward_logits

    full = forward_logits(model[0], torch.tensor([long_prompt]))[0, :-1, :model[2]].log_softmax(-1)
    want = full.gather(1, torch.tensor(long_prompt[1:])[:, None]).flatten()
    got = likelihood["ll"]
    assert len(got.prompt_logprobs) == len(long_prompt) - 1
    diff = (torch.tensor(got.prompt_logprobs) - want).abs()
    assert diff.max() < 1e-5, (diff.max(), diff.argmax(), diff[250:])
    want = recompute_logits(model, long_prompt).softmax(-1)[list(ids)]
    assert torch.allclose(torch.tensor(got.scores), want, rtol=1e-4, atol=0)
    assert len(sampled.logprobs) == 3
    seq = list(ps[1])
    for t, lp in zip(sampled.tokens, sampled.logprobs):
        want = recompute_logits(model, seq).log_softmax(-1)[t].item()
        assert math.isclose(lp, want, abs_tol=1e-5), (lp, want)
        seq.append(t)
    # the engine steps again after close() and a plain forward (step() re-enters inference mode)
    again = run(eng, [("lp", ps[1], SamplingOptions(max_tokens=3, temperature=0.8, logprobs=True))])["lp"]
    assert (again.tokens, again.logprobs) == (sampled.tokens, sampled.logprobs)


def test_int32_overflowing_sampling_fields_are_request_errors(model):
    """megatron-core keeps top_k / top-n as int32: a huge value must be refused at submit, not raise
    inside a step (which would stop every rank)."""
    from megatron_tanuki.inference.engine import RequestError, SamplingOptions

    eng = engine(model)
    with pytest.raises(RequestError, match=r"^top_k and top_logprobs must be below 2\^31$"):
        eng.submit("k", prompts([5])[0], SamplingOptions(temperature=0.8, top_k=2 ** 31))
    assert not eng.has_work()


def test_cancel_during_chunked_prefill_takes_effect(model):
    """A request whose long prompt is being prefilled in chunks is cancelled at once: megatron-core
    drops the stop request while the chunk is in flight, so the engine asks again every step."""
    from megatron_tanuki.inference.engine import SamplingOptions

    eng = engine(model, max_tokens=64)  # 64 tokens per forward: a 300-token prompt takes 5 steps
    rid = eng.submit("long", prompts([300])[0], SamplingOptions(max_tokens=100, temperature=0))
    eng.step()
    assert eng.engine.context.chunked_prefill_request_id == rid  # mid-prefill
    assert eng.cancel(rid) is False
    done = []
    for _ in range(12):
        done += eng.step()
        if done:
            break
    assert [c.finish_reason for c in done] == ["cancelled"] and len(done[0].tokens) < 100
    assert not eng.has_work() and eng.kv_usage() == 0.0


def test_top_logprob_keys_keep_the_word_start_space(model):
    """megatron-core keys top-n log-probs by detokenize([id]); ours reads a token as it does after other
    text, so '▁the' and 'the' are different keys and the chosen token's text is among them."""
    from megatron_tanuki.inference.engine import _ControllerTokenizer

    chunks, tok, _ = model
    c = _ControllerTokenizer(tok)
    word = tok.encode("the cat")
    assert [c.detokenize([i]) for i in word] == [" the", " cat"]
    assert c.detokenize([tok.eos_id]) == ""
