"""Pretraining from Megatron indexed blends, validation, overlapped gradient reduction (issue 14).

Every run is `tanuki train` as a user starts it (2 CPU ranks over gloo) on corpora made by `tanuki
preprocess-data`. References are built independently of our code: the samples from a GPTDataset that
this test configures itself through megatron-core's BlendedMegatronDatasetBuilder (Megatron-LM's sizes,
test split included), the held-out loss from a direct forward of the saved checkpoint in one process
(TP=1, PP=1), whatever layout trained it.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
CONFIG = os.path.join(ROOT, "examples", "tiny_vlm_stage0_text.yaml")
SEQ, GBS, MBS, STEPS, EVAL_ITERS, EVAL_INTERVAL = 32, 8, 2, 4, 2, 2


def _run(*args, timeout=600):
    r = subprocess.run([TANUKI, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _train(base, name, *overrides):
    summary = str(base / f"{name}.json")
    r = _run("train", CONFIG, "--nproc", "2", "--summary-json", summary, *overrides)
    return {**json.load(open(summary)), "stdout": r.stdout}


def _corpus(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("indexed")
    personas = [json.loads(line)["persona"] for line in open(os.path.join(ROOT, "..", "shared", "data", "topic-hub",
                                                                          "persona_jp.jsonl"), encoding="utf-8")]
    # 600 documents each: Megatron-LM's default split 969,30,1 leaves every split a document
    _corpus(base / "ja.jsonl", [f"{personas[i % len(personas)]}は今日も働いています。" * (1 + i % 4) for i in range(600)])
    _corpus(base / "code.jsonl", [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(600)])
    _corpus(base / "heldout.jsonl", [f"{p}の仕事について話します。" for p in personas[:40]])
    for name in ("ja", "code", "heldout"):
        _run("preprocess-data", "--input", str(base / f"{name}.jsonl"), "--output-prefix", str(base / name))
    blend = f"data.blend=[0.7, {base}/ja, 0.3, {base}/code]"
    common = ["data.format=indexed", "data.train=[]", blend, f"data.seq_length={SEQ}", f"train.global_batch_size={GBS}",
              f"train.micro_batch_size={MBS}", f"train.train_steps={STEPS}", f"train.eval_iters={EVAL_ITERS}",
              f"train.eval_interval={EVAL_INTERVAL}", "log.interval=1", "parallel.ep=1", "checkpoint.keep_last=1"]
    out = {"base": base, "common": common}
    # DP=2, overlapped gradient reduction in small buckets, stopped after 2 steps and resumed
    on = [*common, f"checkpoint.dir={base}/on", f"log.dump_batches={base}/dump", "train.ddp_bucket_size=20000",
          f"log.tensorboard_dir={base}/tb"]
    out["on1"] = _train(base, "on1", *on, "train.exit_after_steps=2")
    out["on2"] = _train(base, "on2", *on)
    # the same run without overlap, in one go, evaluated only at the end (so an evaluation between
    # steps cannot change training either)
    out["off"] = _train(base, "off", *common, f"checkpoint.dir={base}/off", "train.overlap_grad_reduce=false",
                        "train.overlap_param_gather=false", "train.eval_interval=null")
    # TP=2: JSONL text with a JSONL held-out set; PP=2: indexed with a separate held-out blend
    out["tp2"] = _train(base, "tp2", "data.format=text", f"data.train=[{base}/ja.jsonl]", f"data.valid=[{base}/heldout.jsonl]",
                        f"data.seq_length={SEQ}", f"train.global_batch_size={GBS}", f"train.micro_batch_size={MBS}",
                        "train.train_steps=2", f"train.eval_iters={EVAL_ITERS}", "parallel.ep=1", "parallel.tp=2", "parallel.sp=true",
                        f"checkpoint.dir={base}/tp2", "log.interval=1")
    out["pp2"] = _train(base, "pp2", *common, "train.train_steps=2", f"data.valid=[{base}/heldout]", "parallel.pp=2",
                        "parallel.vpp=2", f"checkpoint.dir={base}/pp2")  # interleaved: per-chunk grad sync hooks
    return out


class _Tok:
    """What GPTDatasetConfig reads from a tokenizer, from the real Tanuki tokenizer."""

    def __init__(self):
        from megatron_tanuki.data.tokenizer import load_tokenizer

        tok = load_tokenizer()
        self.vocab_size, self.eod, self.pad = tok.vocab_size, tok.eos_id, tok.pad_id
        self.unique_identifiers = {"test": "reference"}


def _megatron_datasets(base, blend, valid_blend=None, steps=STEPS, cache="refcache"):
    """Megatron-LM's datasets for this run, configured here (pretrain_gpt.py's settings and sizes)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    kw = dict(random_seed=1234, sequence_length=SEQ, tokenizer=_Tok(), reset_position_ids=False,
              reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
              path_to_cache=str(base / cache))
    if valid_blend:
        cfg = GPTDatasetConfig(blend_per_split=[blend, valid_blend, None], **kw)
    else:
        cfg = GPTDatasetConfig(blend=blend, split="969,30,1", **kw)
    sizes = [steps * GBS, EVAL_ITERS * (steps // EVAL_INTERVAL + 1) * GBS, EVAL_ITERS * GBS]
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, cfg).build()


def _sampler(start, rank, dp=2):
    """Megatron-LM's MegatronPretrainingSampler: rank r's micro-batches of the global batch at start."""
    return [[start + m * MBS * dp + rank * MBS + j for j in range(MBS)] for m in range(GBS // (MBS * dp))]


def _blend(base):
    return ([str(base / "ja_text_document"), str(base / "code_text_document")], [0.7, 0.3])


def test_indexed_training_sees_megatron_lms_samples_in_order_across_a_resume(runs):
    base = runs["base"]
    train_ds, _, _ = _megatron_datasets(base, _blend(base))
    files = sorted(os.listdir(base / "dump"))
    assert files == [f"step-{s:06d}-rank-{r}.pt" for s in range(1, STEPS + 1) for r in (0, 1)]
    for s in range(1, STEPS + 1):  # steps 1-2 from the first job, 3-4 from the resumed one
        for rank in (0, 1):
            fed = torch.load(base / "dump" / f"step-{s:06d}-rank-{rank}.pt")
            for micro, indices in zip(fed, _sampler((s - 1) * GBS, rank), strict=True):
                ref = [train_ds[i] for i in indices]
                for key in ("tokens", "labels", "position_ids"):
                    assert torch.equal(micro[key], torch.stack([x[key] for x in ref])), (s, rank, key)
                assert torch.equal(micro["loss_mask"], torch.stack([x["loss_mask"] for x in ref]).float())
    assert "[train] resumed from" in runs["on2"]["stdout"]
    assert "indexed blend 0.7 ja_text_document, 0.3 code_text_document" in runs["on1"]["stdout"]


def test_overlapped_gradient_reduction_gives_identical_losses(runs):
    on = runs["on1"]["losses"] + runs["on2"]["losses"]
    assert len(on) == STEPS and on == runs["off"]["losses"]  # bit for bit, across the restart too
    assert [v["step"] for v in runs["on1"]["valid"] + runs["on2"]["valid"]] == [2, 4]
    assert [v["step"] for v in runs["off"]["valid"]] == [4]


def _rank_heldout_loss(ckpt, batches):
    """Rank side: the checkpoint in one process (TP=1, PP=1), token-mean cross entropy over the full
    (padded) vocabulary, as megatron-core's loss and Megatron-LM's count it."""
    from megatron_tanuki.convert.verify import load_checkpoint, read_meta
    from megatron_tanuki.inference.logits import forward_logits
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_distributed

    cfg = read_meta(ckpt)[0]
    init_distributed(ParallelLayout(), registry.language_model(cfg))
    chunks = registry.build(cfg, ParallelLayout(), BuildOptions(dtype="fp32", perform_initialization=False))
    load_checkpoint(chunks, ckpt)
    for c in chunks:
        c.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        for tokens, labels, mask in batches:
            logits = forward_logits(chunks, tokens)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            total += float((ce * mask.flatten()).sum())
            count += float(mask.sum())
    return total / count


def _direct_loss(base, run, batches):
    from megatron_tanuki.runtime.spawn import run_ranks
    from megatron_tanuki.train.checkpoint import resolve

    return run_ranks(_rank_heldout_loss, 1, resolve(str(base / run)), list(batches))[0]


def _indexed_valid_batches(valid_ds):
    for k in range(EVAL_ITERS):
        xs = [valid_ds[i] for i in range(k * GBS, (k + 1) * GBS)]
        yield tuple(torch.stack([x[key] for x in xs]) for key in ("tokens", "labels", "loss_mask"))


def _close(a, b):
    return abs(a - b) <= 1e-5 * max(1.0, abs(b))


def test_validation_loss_equals_a_direct_evaluation_dp2(runs):
    base = runs["base"]
    _, valid_ds, _ = _megatron_datasets(base, _blend(base))
    final = runs["on2"]["valid"][-1]
    assert final["step"] == STEPS
    direct = _direct_loss(base, "on", _indexed_valid_batches(valid_ds))
    assert _close(final["loss"], direct), (final, direct)
    assert _close(final["ppl"], math.exp(direct))
    assert f"[eval] step      {STEPS}/{STEPS}  valid loss" in runs["on2"]["stdout"]
    assert "data-wait" in runs["on2"]["stdout"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(base / "tb")).Reload()
    assert [e.step for e in events.Scalars("valid/loss")] == [2, 4]  # one log dir, both jobs
    assert abs(events.Scalars("valid/loss")[-1].value - final["loss"]) < 1e-5
    assert "train/data_wait_ms" in events.Tags()["scalars"]


def test_validation_loss_equals_a_direct_evaluation_pp2_vpp2_with_a_separate_heldout_blend(runs):
    base = runs["base"]
    _, valid_ds, _ = _megatron_datasets(base, _blend(base), ([str(base / "heldout_text_document")], None), steps=2,
                                        cache="refcache-pp2")
    final = runs["pp2"]["valid"]
    assert [v["step"] for v in final] == [2]
    direct = _direct_loss(base, "pp2", _indexed_valid_batches(valid_ds))
    assert _close(final[0]["loss"], direct), (final, direct)
    assert "from data.valid" in runs["pp2"]["stdout"]


def test_validation_loss_equals_a_direct_evaluation_tp2_on_jsonl(runs):
    from megatron_tanuki.data.records import BadRecords, RecordIndex
    from megatron_tanuki.data.samples import SampleBuilder
    from megatron_tanuki.data.tokenizer import load_tokenizer
    from megatron_tanuki.data.stream import RowStream

    base = runs["base"]
    tok = load_tokenizer()
    stream = RowStream(RecordIndex([str(base / "heldout.jsonl")]), SampleBuilder("text", None, tok, SEQ), SEQ, 1234,
                       pretrain=True, pack=True, bad=BadRecords(10, log=lambda *a: None))
    held_rows = stream.rows_per_epoch()
    iters = min(EVAL_ITERS, held_rows // GBS)
    assert iters >= 1

    def batches():
        for _ in range(iters):
            rows = stream.next_rows(GBS)
            yield torch.tensor([r.inputs for r in rows]), torch.tensor([r.targets for r in rows]), torch.ones(GBS, SEQ)

    final = runs["tp2"]["valid"]
    assert [v["step"] for v in final] == [2]
    direct = _direct_loss(base, "tp2", batches())
    assert _close(final[0]["loss"], direct), (final, direct)
    assert f"{iters} batches of {GBS} rows from 40 held-out records" in runs["tp2"]["stdout"]
