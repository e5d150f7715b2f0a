"""Checkpoints: exact resume, resume under another layout, stage 1 -> stage 2, export of a training run.

Each run is `tanuki train` as a user starts it (2 CPU ranks over gloo), on a small generated dataset.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
STAGE2 = os.path.join(ROOT, "examples", "tiny_vlm_stage2.yaml")
STAGE1 = os.path.join(ROOT, "examples", "tiny_vlm_stage1.yaml")


def train(config, *overrides, summary=None):
    cmd = [TANUKI, "train", config, "--nproc", "2", *overrides]
    if summary:
        cmd += ["--summary-json", summary]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {**json.load(open(summary)), "stdout": r.stdout} if summary else r


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_tanuki.demo.shapes import generate

    base = tmp_path_factory.mktemp("train")
    data = generate(str(base / "data"), n_train=48, n_heldout=4, log=lambda *a: None)
    common = [f"data.train=[{data['stage2']}]", f"data.image_folder={data['images']}", "model.init_checkpoint=null",
              "train.train_steps=4", "train.global_batch_size=4", "train.micro_batch_size=2", "data.seq_length=128",
              "parallel.ep=1", "log.interval=1", "log.tensorboard_dir=null", "checkpoint.save_interval=null",
              "checkpoint.keep_last=2"]
    out = {"base": base, "data": data, "common": common}
    out["a"] = train(STAGE2, *common, f"checkpoint.dir={base}/a", summary=str(base / "a.json"))
    out["b1"] = train(STAGE2, *common, f"checkpoint.dir={base}/b", "train.exit_after_steps=2",
                      summary=str(base / "b1.json"))
    for copy in ("c", "d", "e"):  # resumed below under other layouts / schedules
        shutil.copytree(base / "b", base / copy)
    out["b2"] = train(STAGE2, *common, f"checkpoint.dir={base}/b", summary=str(base / "b2.json"))
    out["c"] = train(STAGE2, *common, f"checkpoint.dir={base}/c", "parallel.tp=2", "parallel.sp=true",
                     summary=str(base / "c.json"))
    # packed THD batches through the pipeline schedule, and a changed LR on resume: kept (default)...
    out["d"] = train(STAGE2, *common, f"checkpoint.dir={base}/d", "parallel.pp=2", "train.lr=0.5",
                     summary=str(base / "d.json"))
    # a second resume of that run (its config.yaml names lr 0.5, its optimizer groups the old lr)
    out["d2"] = train(STAGE2, *common, f"checkpoint.dir={base}/d", "parallel.pp=2", "train.lr=0.5",
                      "train.train_steps=5", summary=str(base / "d2.json"))
    # ...or applied with train.override_lr_scheduler=true
    out["e"] = train(STAGE2, *common, f"checkpoint.dir={base}/e", "train.lr=0.5", "train.override_lr_scheduler=true",
                     summary=str(base / "e.json"))
    return out


def test_resume_under_pp2_with_packed_batches_continues_within_fp32_tolerance(runs):
    a, d = runs["a"]["losses"], runs["d"]["losses"]
    assert len(d) == 2
    for x, y in zip(a[2:], d):  # the checkpoint's LR schedule was kept, so the same run continues
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (a, d)


def test_changed_lr_on_resume_is_reported_and_applied_only_when_asked(runs):
    kept, applied = runs["d"]["stdout"], runs["e"]["stdout"]
    assert "[train] LR schedule: the checkpoint's: lr " in kept
    assert "this config asks for lr 0.5 -- not applied (set train.override_lr_scheduler=true to apply it)" in kept
    assert len(runs["d2"]["losses"]) == 1 and "not applied" in runs["d2"]["stdout"]  # resumes again
    assert "[train] LR schedule: this config's (train.override_lr_scheduler=true): lr 0.5," in applied
    a, e = runs["a"]["losses"], runs["e"]["losses"]
    assert abs(e[0] - a[2]) <= 1e-4 * max(1.0, abs(a[2]))  # step 3's loss comes before the new LR acts
    assert abs(e[1] - a[3]) > 1e-3, (a, e)  # step 4 follows lr 0.5


def test_two_n_steps_equal_n_plus_n_with_a_restart_bit_for_bit(runs):
    a, b1, b2 = runs["a"]["losses"], runs["b1"]["losses"], runs["b2"]["losses"]
    assert len(a) == 4 and len(b1) == 2 and len(b2) == 2
    assert b1 + b2 == a  # exact float equality
    assert runs["b1"]["steps"] == 2 and runs["b2"]["steps"] == 4
    base = runs["base"]
    assert open(base / "b" / "latest").read().strip() == "iter_0000004"
    assert sorted(d for d in os.listdir(base / "b") if d.startswith("iter_")) == ["iter_0000002", "iter_0000004"]
    assert os.path.isfile(base / "b" / "finished") and not any(d.startswith(".tmp") for d in os.listdir(base / "b"))
    cfg = (base / "b" / "iter_0000004" / "config.yaml").read_text()
    assert "mode: vlm_stage2" in cfg and "exit_after_steps: null" in cfg


def test_resume_under_another_layout_continues_within_fp32_tolerance(runs):
    # saved with DP=2 (TP=1), resumed with TP=2 + sequence parallel (DP=1): weights, Adam state and
    # the data position all reshard
    a, c = runs["a"]["losses"], runs["c"]["losses"]
    assert len(c) == 2
    for x, y in zip(a[2:], c):
        assert abs(x - y) <= 1e-4 * max(1.0, abs(x)), (a, c)


def _read(ckpt, names):
    from megatron_tanuki.models.checkpoint_meta import read_meta
    from megatron_tanuki.convert.mcore_io import CheckpointReader, model_layout

    cfg, dtype, _ = read_meta(ckpt)
    _, pieces, shapes = model_layout(cfg, dtype)
    reader = CheckpointReader(ckpt)
    return {n: reader.read_param(pieces[n], shapes[n], dtype) for n in names}


def test_stage1_projector_is_saved_whole_and_loads_into_stage2(runs, single_process):
    base, data = runs["base"], runs["data"]
    a_ckpt = str(base / "a" / "iter_0000004")
    s1 = [f"data.train=[{data['stage1']}]", f"data.image_folder={data['images']}", f"model.init_checkpoint={a_ckpt}",
          "train.train_steps=2", "train.global_batch_size=4", "train.micro_batch_size=2", "parallel.ep=1",
          "log.tensorboard_dir=null", f"checkpoint.dir={base}/s1"]
    train(STAGE1, *s1)
    s2 = [f"data.train=[{data['stage2']}]", f"data.image_folder={data['images']}", f"model.init_checkpoint={base}/s1",
          "train.train_steps=1", "train.global_batch_size=4", "train.micro_batch_size=2", "parallel.ep=1",
          "train.lr=0", "train.warmup_fraction=0", "log.tensorboard_dir=null", f"checkpoint.dir={base}/s2"]
    train(STAGE2, *s2)
    proj = ["vision_projection.encoder.linear_fc1.weight", "vision_projection.encoder.linear_fc1.bias",
            "vision_projection.encoder.linear_fc2.weight", "vision_projection.encoder.linear_fc2.bias"]
    frozen = ["vision_model.conv1.weight", "language_model.decoder.layers.0.self_attention.linear_qkv.weight",
              "language_model.output_layer.weight"]
    a = _read(a_ckpt, proj + frozen)
    one = _read(str(base / "s1" / "iter_0000002"), proj + frozen)
    two = _read(str(base / "s2" / "iter_0000001"), proj + frozen)
    assert [tuple(one[n].shape) for n in proj] == [(64, 64), (64,), (64, 64), (64,)]  # never torch.Size([0])
    assert all(torch.isfinite(one[n]).all() and one[n].abs().sum() > 0 for n in proj)
    assert all(not torch.equal(one[n], a[n]) for n in proj[::2])  # stage 1 trained the projector...
    assert all(torch.equal(one[n], a[n]) for n in frozen)  # ...and nothing else
    assert all(torch.equal(two[n], one[n]) for n in proj + frozen)  # stage 2 (lr 0) started from exactly it


def test_training_checkpoint_exports_to_llava_jp_and_verifies(runs):
    base = runs["base"]
    ckpt, out = str(base / "a" / "iter_0000004"), str(base / "a-hf")
    r = subprocess.run([TANUKI, "convert", "mcore-to-hf", "--ckpt", ckpt, "--out", out], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "llava-jp" and cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["scales"] == [1.0, 0.5]
    r = subprocess.run([TANUKI, "convert", "verify", "--hf", out, "--ckpt", ckpt], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "verify OK" in r.stdout, r.stdout + r.stderr
