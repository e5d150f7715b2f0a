"""Issue 9.2: packed samples are carried as megatron-core PackedSeqParams (THD, cu_seqlens) -- the
form Transformer Engine consumes on the cluster -- and our SDPA attention reads the same boundaries.

A packed batch gives the same per-sample losses and gradients as the samples run one by one
(fp32), for Tanuki and for Tanuki-vision with images; the training batch holds no [s, s] mask.
"""
import pytest
import torch

from megatron_tanuki.data.stream import Row, pad_row
from megatron_tanuki.data.templates import IGNORE_INDEX, IMAGE_TOKEN_ID
from megatron_tanuki.train.batches import pack_thd, segment_bounds
from megatron_tanuki.train.step import Batch

SEQ = 32


def _sample(g, length, vocab, image_tokens=0):
    ids = torch.randint(3, vocab, (length,), generator=g).tolist()
    if image_tokens:
        ids[1:1 + image_tokens] = [IMAGE_TOKEN_ID] * image_tokens
    targets = ids[1:] + [2]
    targets = [IGNORE_INDEX if (t == IMAGE_TOKEN_ID or i < 2) else t for i, t in enumerate(targets)]
    return ids, targets


def _rows(samples, per_row, seq=SEQ):
    rows = []
    for chunk in (samples[i:i + per_row] for i in range(0, len(samples), per_row)):
        row = Row()
        for doc, (ids, tg) in enumerate(chunk):
            row.inputs += ids
            row.targets += tg
            row.positions += range(len(ids))
            row.docs += [doc] * len(ids)
        rows.append(pad_row(row, seq, 0))
    return rows


def _batch(rows, packed, images=None):
    targets = torch.tensor([r.targets for r in rows])
    b = Batch(tokens=torch.tensor([r.inputs for r in rows]), labels=targets.clamp(min=0),
              loss_mask=(targets != IGNORE_INDEX).float(), position_ids=torch.tensor([r.positions for r in rows]),
              images=images)
    return pack_thd(b, [r.docs for r in rows]) if packed else b


def _run(model, batch):
    kw = {"images": batch.images} if batch.images is not None else {}
    if batch.packed_seq_params is not None:
        kw["packed_seq_params"] = batch.packed_seq_params
    return model(batch.tokens, batch.position_ids, None, labels=batch.labels, **kw)  # per-token loss


def test_segment_bounds_and_no_dense_mask():
    rows = _rows([([5] * 10, [5] * 10), ([6] * 7, [6] * 7), ([7] * 12, [7] * 12)], per_row=2)
    assert segment_bounds([r.docs for r in rows]) == [0, 10, 17, 32, 44, 64]  # pads: one segment per row
    b = _batch(rows, packed=True)
    assert b.attention_mask is None and b.tokens.shape == (1, 64)
    assert b.packed_seq_params.qkv_format == "thd"
    assert b.packed_seq_params.cu_seqlens_q.dtype == torch.int32
    assert b.packed_seq_params.max_seqlen_q == 20


@pytest.mark.parametrize("preset", ["tanuki-8b-tiny", "tanuki-vision-8b-tiny"])
def test_packed_equals_one_by_one(single_process, preset):
    from megatron_tanuki.models.registry import get_preset
    from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model
    from megatron_tanuki.models.tanuki_vision.builder import build_vlm
    from megatron_tanuki.runtime.distributed import ParallelLayout

    torch.manual_seed(0)
    cfg = get_preset(preset)
    vision = hasattr(cfg, "llm")
    (model,) = (build_vlm if vision else build_model)(cfg, ParallelLayout(), BuildOptions(dtype="fp32"))
    if vision:
        model.set_trainable(projector=True, language_model=True)
    llm = cfg.llm if vision else cfg
    g = torch.Generator().manual_seed(1)
    n_img = cfg.num_image_tokens if vision else 0
    seq = max(SEQ, 2 * n_img + 20)
    lengths = [n_img + 5, n_img + 9, n_img + 6, n_img + 11]
    samples = [_sample(g, n, llm.vocab_size, n_img) for n in lengths]
    images = torch.randn(len(samples), 3, cfg.image_size, cfg.image_size, generator=g) if vision else None

    # packed: 2 samples per row, 2 rows -> one THD sequence of 2 * seq tokens
    packed = _batch(_rows(samples, 2, seq), packed=True, images=images)
    model.zero_grad()
    per_token = _run(model, packed)
    mask = packed.loss_mask
    bounds = packed.packed_seq_params.cu_seqlens_q.tolist()
    starts = [0, len(samples[0][0]), seq, seq + len(samples[2][0])]
    assert [b for b in bounds if b in starts] == starts
    packed_losses = [(per_token[0, a:a + len(s[0])] * mask[0, a:a + len(s[0])]).sum() for a, s in zip(starts, samples)]
    sum(packed_losses).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # one by one, unpacked, no mask at all
    model.zero_grad()
    single_losses = []
    for k, s in enumerate(samples):
        one = _batch(_rows([s], 1, seq), packed=False, images=images[k:k + 1] if vision else None)
        loss = (_run(model, one) * one.loss_mask).sum()
        loss.backward()
        single_losses.append(loss.detach())
    for a, b in zip(packed_losses, single_losses):
        torch.testing.assert_close(a.detach(), b, rtol=1e-5, atol=1e-5)
    single_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(packed_grads) == set(single_grads) and len(packed_grads) > 10
    for n, gp in packed_grads.items():
        gs = single_grads[n]
        rel = (gp - gs).norm() / gs.norm().clamp_min(1e-30)
        assert rel < 1e-5, f"{n}: relative gradient difference {rel:.2e}"
