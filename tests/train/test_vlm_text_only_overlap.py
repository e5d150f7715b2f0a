"""VLM stage 2 with overlapped gradient reduction (the default) on data that mixes text-only
conversations in: a step whose last micro-batch has no image must still reduce the projector's
gradient bucket (megatron starts a bucket only when every parameter in it has a gradient from the
last micro-batch; before the fix the run stopped with "Communication call has not been issued")."""
import json
import os
import subprocess
import sys

TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_text_only_micro_batches_train_with_overlapped_reduction(tmp_path):
    from megatron_tanuki.demo.shapes import generate

    data = generate(str(tmp_path / "data"), n_train=4, n_heldout=1, log=lambda *a: None)
    records = json.load(open(data["stage2"], encoding="utf-8"))[:2]
    records += [{"id": f"text{i}", "conversations": [{"from": "human", "value": f"{i}たす{i}は?"},
                                                     {"from": "gpt", "value": f"{2 * i}です。"}]} for i in range(10)]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    summary = tmp_path / "s.json"
    r = subprocess.run([TANUKI, "train", os.path.join(ROOT, "examples", "tiny_vlm_stage2.yaml"), "--nproc", "2",
                        "--summary-json", str(summary), f"data.train=[{path}]", f"data.image_folder={data['images']}",
                        "model.init_checkpoint=null", "parallel.ep=1", "data.pack=false", "train.train_steps=3",
                        "train.global_batch_size=4", "train.micro_batch_size=1", "data.seq_length=128",
                        "checkpoint.dir=null", "log.tensorboard_dir=null", "train.ddp_bucket_size=10000"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.load(open(summary))
    assert s["steps"] == 3 and all(x == x for x in s["losses"])  # three finite losses
