"""Issue 9.3: a fine-tuned checkpoint exports to an HF folder that transformers loads.

HF folder -> `tanuki convert hf-to-mcore` -> `tanuki train` a few steps from it -> `tanuki convert
mcore-to-hf` -> transformers `from_pretrained` (trust_remote_code for the MoE), and its logits equal
the trained Megatron model's (`convert verify`). Before the fix the training checkpoint recorded the
tokenizer's 65000 rows while the copied config.json said 65024, and transformers refused the folder.
"""
import json
import os
import subprocess
import sys

import torch

from tests.convert import tiny_hf, tiny_llava

TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")


def _tanuki(*args):
    r = subprocess.run([TANUKI, *args], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _train_and_export(tmp_path, preset: str, overrides: dict, data: dict, mode: str) -> tuple[str, str]:
    """`tanuki train` 2 steps (fp32) from tmp_path/ck, then `convert mcore-to-hf`: (trained, exported)."""
    import yaml

    cfg = tmp_path / "run.yaml"
    with open(cfg, "w") as f:
        yaml.safe_dump({"model": {"preset": preset, "dtype": "fp32", "init_checkpoint": str(tmp_path / "ck"),
                                  "overrides": overrides},
                        "data": {**data, "pack": True},
                        "train": {"mode": mode, "global_batch_size": 2, "micro_batch_size": 1, "train_steps": 2,
                                  "lr": 1e-3, "warmup_fraction": 0.0},
                        "checkpoint": {"dir": str(tmp_path / "run")}, "log": {"tensorboard_dir": None}}, f)
    _tanuki("train", str(cfg), "--nproc", "1")
    trained, out = str(tmp_path / "run" / "iter_0000002"), str(tmp_path / "exported")
    _tanuki("convert", "mcore-to-hf", "--ckpt", trained, "--out", out)
    return trained, out


def test_moe_sft_from_converted_checkpoint_exports_and_loads(tmp_path):
    from megatron_tanuki.convert.verify import hf_reference_logits, verify

    hf = tiny_hf.save(tiny_hf.moe_model(seed=3), str(tmp_path / "hf"), dtype=torch.float32)
    _tanuki("convert", "hf-to-mcore", "--hf", hf, "--out", str(tmp_path / "ck"))
    data = tmp_path / "chat.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(6):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}たす{i}は?"},
                                             {"role": "assistant", "content": f"{2 * i}です。"}]},
                               ensure_ascii=False) + "\n")
    trained, out = _train_and_export(
        tmp_path, "tanuki-8x8b-tiny", {"num_layers": 2, "num_experts": 4, "max_position_embeddings": 256},
        {"format": "chat", "train": [str(data)], "seq_length": 64}, "sft")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert model.config.vocab_size == 65024 and model.get_input_embeddings().weight.shape[0] == 65024
    r = verify(out, trained)  # the trained Megatron model (loaded by megatron-core) vs the exported folder
    assert r["ok"], r
    ids = torch.tensor([[1, 300, 4000, 65000, 12]])
    with torch.no_grad():
        loaded = model(ids).logits.float()
        # the source folder was written by transformers' save_pretrained of our class (no auto_map)
        original = tiny_hf.load_remote_code_classes()[1].from_pretrained(hf, dtype=torch.float32)(ids).logits
    assert torch.equal(loaded, hf_reference_logits(out, ids))  # what verify compared against
    assert not torch.allclose(loaded, original, atol=1e-3)  # the export holds the trained weights


def test_vlm_stage2_from_converted_llava_jp_exports_and_verifies(tmp_path):
    from megatron_tanuki.convert.verify import verify
    from megatron_tanuki.demo.shapes import generate

    paths = tiny_llava.build(str(tmp_path / "src"), moe=False, dtype=torch.float32)
    _tanuki("convert", "hf-to-mcore", "--hf", paths["llava"], "--out", str(tmp_path / "ck"))
    data = generate(str(tmp_path / "data"), n_train=8, n_heldout=2, log=lambda *a: None)
    trained, out = _train_and_export(
        tmp_path, "tanuki-vision-8b-tiny", {"num_layers": 2, "max_position_embeddings": 256},
        {"format": "llava", "train": [data["stage2"]], "image_folder": data["images"], "seq_length": 128},
        "vlm_stage2")
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["vocab_size"] == 65024 and config["model_type"] == "llava-jp"
    r = verify(out, trained)
    assert r["ok"], r
