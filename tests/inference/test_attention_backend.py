"""The dynamic path's attention kernel on CPU (``attention_backend.paged_sdpa``) is exact, and the
backend is chosen, installed and announced once.

The reference is written the plain way, one request at a time: follow the block table to gather the
request's keys and values page by page, repeat KV heads for GQA, and run causal attention aligned
bottom-right (query ``i`` of ``lq`` queries over ``lk`` keys sees keys ``0..lk-lq+i``) with explicit
scores and softmax in float64. Cache slots outside a request's length hold random values, so a
mask that lets them through shows up as a difference.
"""
import math
import subprocess
import sys

import pytest
import torch

from megatron_tanuki.inference import attention_backend


def reference(q, k_cache, v_cache, q_lens, k_lens, block_table, scale, tokens):
    """Per request: pages -> keys, GQA repeat, bottom-right causal softmax (float64)."""
    heads, dim = q.shape[-2], q.shape[-1]
    groups, block = k_cache.shape[2], k_cache.shape[1]
    out = torch.zeros(tokens, heads, dim, dtype=torch.float64)
    start = 0
    for lq, lk, row in zip(q_lens, k_lens, block_table.tolist()):
        if lk == 0:
            continue
        pages = row[: math.ceil(lk / block)]
        assert -1 not in pages
        keys = torch.cat([k_cache[p] for p in pages])[:lk].double()        # [lk, G, D]
        values = torch.cat([v_cache[p] for p in pages])[:lk].double()
        keys = keys.repeat_interleave(heads // groups, dim=1)               # [lk, H, D]
        values = values.repeat_interleave(heads // groups, dim=1)
        for i in range(lq):
            query = q[start + i, 0].double()                                # [H, D]
            seen = lk - lq + i + 1
            scores = torch.einsum("hd,khd->hk", query, keys[:seen]) * scale
            out[start + i] = torch.einsum("hk,khd->hd", scores.softmax(-1), values[:seen])
        start += lq
    return out.unsqueeze(1)


def make_case(q_lens, k_lens, *, heads=4, groups=4, dim=16, block=8, blocks=40, pad_tokens=0, seed=0):
    """Random q and cache; each live request gets ceil(lk/block) distinct, shuffled block ids."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(q_lens) + pad_tokens
    q = torch.randn(tokens, 1, heads, dim, generator=g)
    k_cache = torch.randn(blocks, block, groups, dim, generator=g)
    v_cache = torch.randn(blocks, block, groups, dim, generator=g)
    free = torch.randperm(blocks, generator=g).tolist()
    width = max(1, max(math.ceil(lk / block) for lk in k_lens))
    table = torch.full((len(q_lens), width), -1, dtype=torch.int32)
    for r, lk in enumerate(k_lens):
        n = math.ceil(lk / block)
        table[r, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
    cu_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + k_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    seqlens_k = torch.tensor(k_lens, dtype=torch.int32)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                seqlens_k=seqlens_k, block_table=table, scale=dim ** -0.5)


def check(q_lens, k_lens, **kw):
    case = make_case(q_lens, k_lens, **kw)
    out = attention_backend.paged_sdpa(**case, max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens))
    tokens = case["q"].shape[0]
    ref = reference(case["q"], case["k_cache"], case["v_cache"], q_lens, k_lens, case["block_table"],
                    case["scale"], tokens)
    assert out.shape == case["q"].shape and out.dtype == torch.float32
    diff = (out.double() - ref).abs().max().item()
    assert diff <= 1e-6, diff
    return case, out


def test_mixed_prefill_chunk_and_decode_requests_of_different_lengths():
    # a whole prefill (lq == lk), a decode (lq == 1), a prefill chunk continuing a prompt
    # (1 < lq < lk), a one-token prompt, another decode deep into its third page
    check([13, 1, 6, 1, 1], [13, 9, 21, 1, 20])


def test_gqa_fewer_kv_heads_than_query_heads():
    check([7, 1, 12], [7, 30, 12], heads=8, groups=2)


def test_multi_page_requests_with_shuffled_block_ids():
    case, _ = check([40, 1, 17], [40, 57, 33], block=8, blocks=30, heads=4, groups=1, seed=3)
    used = case["block_table"][case["block_table"] >= 0].tolist()
    assert len(used) == 5 + 8 + 5 and len(set(used)) == len(used)   # distinct pages, 18 of 30
    assert used[:5] != sorted(used[:5])                             # not laid out in order


def test_padded_request_and_padding_tokens_give_zero_rows():
    # megatron-core pads the batch: a request with no queries and no keys (block row -1) and
    # query rows past the last request (prefill is padded to 64 tokens)
    case, out = check([5, 1, 0], [5, 11, 0], pad_tokens=6, seed=1)
    assert case["block_table"][2].tolist() == [-1, -1]
    assert out.shape[0] == 12 and torch.count_nonzero(out[6:]) == 0
    assert torch.count_nonzero(out[:6]) == out[:6].numel()


def test_a_batch_of_only_padding_is_all_zeros():
    case = make_case([0, 0], [0, 0], pad_tokens=4)
    out = attention_backend.paged_sdpa(**case)
    assert out.shape == (4, 1, 4, 16) and torch.count_nonzero(out) == 0


def test_megatron_block_size_and_a_long_prompt():
    # the engine's real page size (256 tokens), a prompt over two pages beside two decodes
    check([300, 1, 1], [300, 257, 2], block=256, blocks=6, heads=4, groups=2, dim=8, seed=2)


def test_choose_is_paged_sdpa_on_a_machine_without_gpu_or_flash_attn():
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    assert not attention_backend.flash_attn_installed()
    assert attention_backend.choose() == "paged-sdpa"


def test_rearrange_stand_in_is_the_one_reshape_megatron_asks_for():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    y = attention_backend._rearrange_merge_heads(x, "s b h d -> s b (h d)")
    assert y.shape == (2, 3, 20) and torch.equal(y, x.reshape(2, 3, 20))
    assert torch.equal(y[1, 2, 5:10], x[1, 2, 1])      # head 1 of token (1, 2), contiguous
    with pytest.raises(NotImplementedError, match=r"rearrange\('b s h d -> s b h d'\) without einops"):
        attention_backend._rearrange_merge_heads(x, "b s h d -> s b h d")


INSTALL = r"""
import sys
sys.modules["einops"] = None          # einops absent, whatever this environment has
import torch
from megatron.core.transformer import attention
assert attention.rearrange is None
from megatron_tanuki.inference import attention_backend as ab
assert ab.chosen() is None
names = [ab.install(), ab.install(), ab.install(verbose=True)]
x = torch.randn(3, 2, 4, 5)
y = attention.rearrange(x, 's b h d -> s b (h d)')     # the call in Attention.forward
print("RESULT", names, ab.chosen(), ab.choose(), tuple(y.shape), torch.equal(y, x.reshape(3, 2, 20)),
      attention.is_fa_min_version("2.7.3"), attention.Attention.flash_decode_and_prefill.__doc__)
"""


def test_install_prints_the_choice_once_and_replaces_rearrange_without_einops():
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    r = subprocess.run([sys.executable, "-c", INSTALL], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line for line in lines if "attention backend" in line] == \
        ["[tanuki] inference attention backend: paged-sdpa"]
    result = [line for line in lines if line.startswith("RESULT ")]
    assert result == ["RESULT ['paged-sdpa', 'paged-sdpa', 'paged-sdpa'] paged-sdpa paged-sdpa (3, 2, 20) True "
                      "True megatron_tanuki: paged_sdpa (inference/attention_backend.py)"]


def test_torch_varlen_path_takes_the_paged_sdpa_where_fa2_cannot_run(capsys):
    """The CUDA backend's own guard: fp32, 8-token pages or a CPU tensor go to the paged SDPA (exact)
    with one line saying why; PyTorch's FA2 would refuse them (fp16/bf16 and 256-token pages only)."""
    case = make_case([5, 1, 3], [5, 9, 3], block=8)
    assert not attention_backend.varlen_supports(case["q"], case["k_cache"])
    out = attention_backend._torch_varlen(**case, max_seqlen_q=5, max_seqlen_k=9)
    want = attention_backend.paged_sdpa(**case)
    assert torch.equal(out, want)
    attention_backend._torch_varlen(**case, max_seqlen_q=5, max_seqlen_k=9)
    printed = capsys.readouterr().out
    assert printed.count("-> paged-sdpa (torch varlen_attn needs fp16/bf16 and 256-token pages)") == 1
