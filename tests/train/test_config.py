"""Run configs: every example loads; overrides; errors name the key and the file."""
import glob
import os

import pytest

from megatron_tanuki.train.config import ConfigError, load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# training configs; examples/synth_*.yaml are `tanuki synth` recipes (tests/synth/test_recipe.py loads them)
EXAMPLES = sorted(p for p in glob.glob(os.path.join(ROOT, "examples", "*.yaml"))
                  if not os.path.basename(p).startswith("synth_"))


def test_examples_exist_for_each_run_the_issue_names():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"tiny_vlm_stage1.yaml", "tiny_vlm_stage2.yaml", "tanuki_8b_sft.yaml", "tanuki_8x8b_sft.yaml",
            "tanuki_8x8b_vlm_stage1.yaml", "tanuki_8x8b_vlm_stage2.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_every_example_loads(path):
    cfg = load(path)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_seed_hyper_parameters_are_the_defaults_of_the_8x8b_vlm_examples():
    s1 = load(os.path.join(ROOT, "examples", "tanuki_8x8b_vlm_stage1.yaml"))
    s2 = load(os.path.join(ROOT, "examples", "tanuki_8x8b_vlm_stage2.yaml"))
    assert (s1.train.mode, s1.train.lr, s1.train.lr_schedule, s1.train.warmup_fraction, s1.train.weight_decay) == \
        ("vlm_stage1", 1e-3, "cosine", 0.03, 0.0)
    assert (s2.train.mode, s2.train.lr, s2.train.lr_schedule) == ("vlm_stage2", 2e-5, "cosine")
    assert s1.model.overrides == {"rope_theta": 10000.0, "max_position_embeddings": 2048}


def test_overrides_are_parsed_as_yaml_and_win():
    cfg = load(os.path.join(ROOT, "examples", "tiny_vlm_stage2.yaml"),
               ["train.lr=1e-4", "parallel.ep=1", "data.train=[a.json, b.json]", "model.init_checkpoint=null"])
    assert cfg.train.lr == 1e-4 and cfg.parallel.ep == 1 and cfg.data.train == ["a.json", "b.json"]
    assert cfg.model.init_checkpoint is None


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown key 'train.lrr'"),
    ("training.lr=1", "unknown key 'training'"),
    ("train.micro_batch_size=two", "train.micro_batch_size must be an integer, got 'two'"),
    ("train.mode=dpo", "train.mode must be one of"),
    ("data.format=text", "train.mode vlm_stage2 needs data.format llava"),
    ("train.global_batch_size=7", "global_batch_size 7 is not a multiple of train.micro_batch_size"),
    ("lr=1", "the key needs a section"),
])
def test_bad_overrides_name_the_key_and_the_file(override, message):
    with pytest.raises(ConfigError, match="tiny_vlm_stage2.yaml") as e:
        load(os.path.join(ROOT, "examples", "tiny_vlm_stage2.yaml"), [override])
    assert message in str(e.value)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="x.yaml: invalid YAML"):
        load(str(p))
    p.write_text("train:\n  mode: sft\n  lr: fast\n")
    with pytest.raises(ConfigError, match="train.lr must be a number, got 'fast'"):
        load(str(p))


@pytest.mark.parametrize("drop,message", [
    ("preset", "model.preset is required (one of the names `tanuki model-info --list` prints, e.g. tanuki-8x8b)"),
    ("mode", "train.mode is required (one of ['pretrain', 'sft', 'vlm_stage1', 'vlm_stage2'])"),
])
def test_preset_and_mode_are_required(tmp_path, drop, message):
    """A config that forgets what to train fails naming the key and the file, instead of training
    some default model."""
    src = open(os.path.join(ROOT, "examples", "tiny_vlm_stage2.yaml"), encoding="utf-8").read()
    lines = [ln for ln in src.splitlines() if not ln.strip().startswith(f"{drop}:")]
    assert len(lines) == len(src.splitlines()) - 1
    p = tmp_path / "forgot.yaml"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load(str(p))
    assert str(e.value) == f"{p}: {message}"
    key = "model.preset=tanuki-vision-8x8b-tiny" if drop == "preset" else "train.mode=vlm_stage2"
    assert load(str(p), [key]).to_dict() == load(os.path.join(ROOT, "examples", "tiny_vlm_stage2.yaml")).to_dict()


def test_resolved_yaml_round_trips_with_every_default(tmp_path):
    """What `tanuki train --print-config` prints loads back to the same config, and names every key."""
    cfg = load(os.path.join(ROOT, "examples", "tiny_vlm_stage1.yaml"), ["train.lr=3e-4"])
    p = tmp_path / "resolved.yaml"
    p.write_text(cfg.to_yaml())
    assert load(str(p)) == cfg
    import yaml

    tree = yaml.safe_load(cfg.to_yaml())
    assert tree["train"]["lr"] == 3e-4 and tree["train"]["adam_eps"] == 1e-8 and tree["log"]["interval"] == 10
