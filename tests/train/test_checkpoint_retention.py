"""Keep-last retention and the run-folder check of train/checkpoint.py, on real folders."""
import os
import subprocess
import sys

import pytest
import yaml

from megatron_tanuki.train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_folder(root, steps, latest, preset="tanuki-8x8b", mode="sft"):
    for step in steps:
        d = root / ckpt.iter_name(step)
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"model": {"preset": preset}, "train": {"mode": mode},
                                                       "parallel": {"tp": 1, "pp": 2, "ep": 8}}))
    ckpt.write_latest(str(root), ckpt.iter_name(latest))
    return str(root)


def test_retention_keeps_the_checkpoint_latest_points_at_after_a_rollback(tmp_path):
    # 100..300 saved; the user rolled `latest` back to 100, resumed, and step 150 was just saved
    root = _run_folder(tmp_path, [100, 200, 300, 150], latest=150)
    # the live run is 100 -> 150 (latest); 200 and 300 belong to the abandoned line: not counted, not removed
    assert ckpt.to_remove(root, 2) == []  # old code (name order, latest ignored): 100 and 150
    assert ckpt.to_remove(root, 1) == ["iter_0000100"]  # old code: 100, 150 and 200
    assert ckpt.to_remove(root, None) == [] and ckpt.to_remove(root, 0) == []
    assert ckpt.prune(root, 1) == ["iter_0000100"]
    assert sorted(os.listdir(root)) == ["iter_0000150", "iter_0000200", "iter_0000300", "latest"]
    assert ckpt.resolve(root) == os.path.join(root, "iter_0000150")


def test_abandoned_line_is_set_aside_at_the_first_save_after_a_rollback(tmp_path):
    # 100, 200, 300 saved; `latest` rolled back to 100; the resumed run saves at other steps
    root = _run_folder(tmp_path, [100, 200, 300], latest=100)
    assert ckpt.set_aside_abandoned(root) == ["abandoned-iter_0000200", "abandoned-iter_0000300"]
    for step in (150, 250):  # what save() publishes next
        os.makedirs(os.path.join(root, ckpt.iter_name(step)))
        ckpt.write_latest(root, ckpt.iter_name(step))
        assert ckpt.set_aside_abandoned(root) == []
    assert ckpt.to_remove(root, 2) == ["iter_0000100"]  # the live 150 stays; without setting aside: 100, 150
    assert sorted(os.listdir(root)) == ["abandoned-iter_0000200", "abandoned-iter_0000300", "iter_0000100",
                                        "iter_0000150", "iter_0000250", "latest"]


def test_retention_orders_by_iteration_number_not_by_name(tmp_path):
    # past step 9,999,999 the folder name has 8 digits and sorts before "iter_9999999" as text
    root = _run_folder(tmp_path, [9_999_998, 9_999_999, 10_000_000], latest=10_000_000)
    assert [n for _, n in ckpt.iterations(root)] == ["iter_9999998", "iter_9999999", "iter_10000000"]
    assert ckpt.to_remove(root, 2) == ["iter_9999998"]
    (tmp_path / ".tmp-iter_10000001").mkdir()  # an unfinished save and a stray file are never counted
    (tmp_path / "iter_0000001").write_text("not a folder")
    assert ckpt.to_remove(root, 2) == ["iter_9999998"]


def test_latest_pointer_is_replaced_whole(tmp_path):
    root = _run_folder(tmp_path, [1, 2], latest=1)
    ckpt.write_latest(root, "iter_0000002")
    assert (tmp_path / "latest").read_text() == "iter_0000002\n"
    assert not (tmp_path / ".latest.tmp").exists()
    assert ckpt.latest_name(root) == "iter_0000002"


def test_run_folder_of_another_model_or_mode_is_refused(tmp_path):
    root = _run_folder(tmp_path / "stage1", [2], latest=2, preset="tanuki-vision-8x8b-tiny", mode="vlm_stage1")
    ckpt.check_run_folder(root, "tanuki-vision-8x8b-tiny", "vlm_stage1")  # same: no error
    ckpt.check_run_folder(str(tmp_path / "empty"), "tanuki-vision-8x8b", "vlm_stage1")  # no checkpoint yet
    with pytest.raises(ValueError) as e:
        ckpt.check_run_folder(root, "tanuki-vision-8x8b", "vlm_stage1")
    assert str(e.value).startswith(
        f"run folder {root} holds a checkpoint of model.preset=tanuki-vision-8x8b-tiny train.mode=vlm_stage1 "
        f"({root}/iter_0000002/config.yaml), but this run asks for model.preset=tanuki-vision-8x8b "
        f"train.mode=vlm_stage1")
    with pytest.raises(ValueError, match="train.mode=vlm_stage1 .* asks for model.preset=tanuki-vision-8x8b-tiny "
                                         "train.mode=vlm_stage2"):
        ckpt.check_run_folder(root, "tanuki-vision-8x8b-tiny", "vlm_stage2")
    os.remove(os.path.join(root, "iter_0000002", "config.yaml"))
    with pytest.raises(ValueError) as e:
        ckpt.check_run_folder(root, "tanuki-vision-8x8b-tiny", "vlm_stage1")
    assert str(e.value).startswith(f"run folder {root}: checkpoint {root}/iter_0000002 has no config.yaml")


def test_check_command_for_the_slurm_scripts(tmp_path):
    root = _run_folder(tmp_path / "run", [3], latest=3, preset="tanuki-8x8b-tiny", mode="sft")
    cmd = [sys.executable, "-m", "megatron_tanuki.train.checkpoint"]
    ok = subprocess.run([*cmd, "check", root, "tanuki-8x8b-tiny", "sft"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*cmd, "check-config", root, "examples/tanuki_8x8b_sft.yaml", "data.train=[x.jsonl]"],
                         capture_output=True, text=True, cwd=ROOT)
    preset = yaml.safe_load(open(os.path.join(ROOT, "examples/tanuki_8x8b_sft.yaml")))["model"]["preset"]
    assert bad.returncode == 1
    assert f"but this run asks for model.preset={preset} train.mode=sft" in bad.stderr
    same = subprocess.run([*cmd, "check-config", root, "examples/tanuki_8x8b_sft.yaml", "data.train=[x.jsonl]",
                           "model.preset=tanuki-8x8b-tiny"], capture_output=True, text=True, cwd=ROOT)
    assert same.returncode == 0, same.stderr
    usage = subprocess.run([*cmd, "check", root], capture_output=True, text=True, cwd=ROOT)
    assert usage.returncode == 2 and "usage: python -m megatron_tanuki.train.checkpoint check" in usage.stderr
