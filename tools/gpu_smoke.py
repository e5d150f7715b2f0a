"""GPU smoke steps for one backend (tools/gpu_smoke.sh runs this with TANUKI_TE=0 and with TE).

Each step prints one line ``ok``/``FAILED`` with its numbers; the exit status is 1 if any failed.
Needs a GPU (the shell wrapper refuses without one).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
KINDS = ["tanuki-8b-tiny", "tanuki-8x8b-tiny", "tanuki-vision-8b-tiny", "tanuki-vision-8x8b-tiny"]


def placement() -> str:
    """Every kind built as a run builds it (device=None): nothing may stay on the CPU."""
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.tanuki.builder import BuildOptions, build_model
    from megatron_tanuki.models.tanuki_vision.builder import build_vlm
    from megatron_tanuki.runtime.distributed import ParallelLayout

    for name in KINDS:
        cfg = registry.get_preset(name)
        chunks = (build_vlm if hasattr(cfg, "llm") else build_model)(cfg, ParallelLayout(), BuildOptions())
        off = [n for c in chunks for n, t in [*c.named_parameters(), *c.named_buffers()] if t.device.type != "cuda"]
        assert not off, f"{name}: not on the GPU: {off[:5]}"
    return f"{len(KINDS)} kinds, every parameter and buffer on cuda"


def full_width_packed_step() -> str:
    """2-layer full-width Tanuki-vision-8x8B, bf16: forward + backward of one packed THD batch."""
    from megatron_tanuki.data.stream import Row, pad_row
    from megatron_tanuki.data.templates import IMAGE_TOKEN_ID
    from megatron_tanuki.models import registry
    from megatron_tanuki.models.tanuki.builder import BuildOptions
    from megatron_tanuki.models.tanuki_vision.builder import build_vlm
    from megatron_tanuki.runtime.distributed import ParallelLayout
    from megatron_tanuki.train.batches import pack_thd
    from megatron_tanuki.train.step import Batch

    base = registry.get_preset("tanuki-vision-8x8b")
    cfg = base.replace(llm=base.llm.replace(num_layers=2))
    (model,) = build_vlm(cfg, ParallelLayout(), BuildOptions(dtype="bf16"))
    model.set_trainable(projector=True, language_model=True)
    n_img, seq = cfg.num_image_tokens, 2048
    row = Row()
    for doc, text in enumerate((200, 300)):
        ids = [1] + [IMAGE_TOKEN_ID] * n_img + list(range(100, 100 + text))
        row.inputs += ids
        row.targets += ids[1:] + [2]
        row.positions += range(len(ids))
        row.docs += [doc] * len(ids)
    row = pad_row(row, seq, 0)
    t = torch.tensor([row.inputs])
    batch = pack_thd(Batch(tokens=t, labels=torch.tensor([row.targets]).clamp(min=0),
                           loss_mask=torch.ones(1, seq), position_ids=torch.tensor([row.positions]),
                           images=torch.randn(2, 3, cfg.image_size, cfg.image_size, dtype=torch.bfloat16)),
                     [row.docs]).to(torch.cuda.current_device())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = model(batch.tokens, batch.position_ids, None, images=batch.images, labels=batch.labels,
                 packed_seq_params=batch.packed_seq_params)
    (loss.float() * batch.loss_mask).sum().backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss).all()
    grads = sum(1 for p in model.parameters() if p.requires_grad and p.grad is not None)
    return (f"loss {float(loss.float().mean()):.3f}, {grads} gradients, {time.perf_counter() - t0:.2f} s, "
            f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def _tanuki(*args) -> str:
    r = subprocess.run([TANUKI, *args], capture_output=True, text=True, timeout=400)
    if r.returncode:
        raise RuntimeError(f"tanuki {' '.join(args[:2])} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def train_resume_export(out: str) -> str:
    """`tanuki train` one packed step, resume one more, export to LLaVA-JP, verify against transformers."""
    import shutil

    from megatron_tanuki.demo.shapes import generate

    shutil.rmtree(os.path.join(out, "run"), ignore_errors=True)  # a rerun must train again
    data = generate(os.path.join(out, "data"), n_train=16, n_heldout=2, log=lambda *a: None)
    common = ["--nproc", "1", f"data.train=[{data['stage2']}]", f"data.image_folder={data['images']}",
              "model.init_checkpoint=null", "parallel.ep=1", "train.global_batch_size=4", "train.micro_batch_size=2",
              "data.pack=true", f"checkpoint.dir={out}/run", "log.tensorboard_dir=null", "log.interval=1"]
    stage2 = os.path.join(ROOT, "examples", "tiny_vlm_stage2.yaml")
    _tanuki("train", stage2, *common, "train.train_steps=2", "train.exit_after_steps=1")
    log = _tanuki("train", stage2, *common, "train.train_steps=2")
    assert "resumed from" in log, log[-1000:]
    ckpt = os.path.join(out, "run", "iter_0000002")
    _tanuki("convert", "mcore-to-hf", "--ckpt", ckpt, "--out", os.path.join(out, "hf"), "--overwrite")
    v = _tanuki("convert", "verify", "--hf", os.path.join(out, "hf"), "--ckpt", ckpt)
    assert "verify OK" in v, v
    return v.strip().splitlines()[-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", required=True, choices=["local", "te"])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    from megatron_tanuki.models import specs
    from megatron_tanuki.runtime.distributed import ParallelLayout, init_single_process

    assert specs.te_available() == (a.backend == "te"), "TANUKI_TE does not match the backend asked for"
    init_single_process(ParallelLayout())
    failed = 0
    for name, step in (("placement", placement), ("full-width packed step", full_width_packed_step),
                       ("train/resume/export/verify", lambda: train_resume_export(a.out))):
        try:
            print(f"[{a.backend}] {name}: ok: {step()}", flush=True)
        except Exception:  # noqa: BLE001 -- report every step, then fail
            failed += 1
            print(f"[{a.backend}] {name}: FAILED\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
