"""The `tanuki` command's own surfaces: --version, model-info --list, train --print-config, required
config keys, --nproc under a launcher, and what a user sees when something fails."""
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
import torch

import megatron_tanuki
from megatron_tanuki import cli
from megatron_tanuki.runtime import crash
from megatron_tanuki.runtime.spawn import RankFailed, run_ranks
from megatron_tanuki.train.config import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
STAGE2 = os.path.join(ROOT, "examples", "tiny_vlm_stage2.yaml")


def _tanuki(*args, env=None, cwd=None):
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "SLURM_PROCID", "SLURM_STEP_ID", "TANUKI_DEBUG")}
    return subprocess.run([TANUKI, *args], capture_output=True, text=True, env={**base, **(env or {})}, cwd=cwd)


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def test_version():
    r = _tanuki("--version")
    assert r.returncode == 0 and r.stderr == ""
    assert megatron_tanuki.__version__ == metadata.version("megatron_tanuki")  # setup.py and __init__ agree
    assert r.stdout == (f"tanuki {megatron_tanuki.__version__} (megatron-core {_version('megatron-core')}, "
                        f"torch {_version('torch')}, transformers {_version('transformers')}, "
                        f"transformer-engine {_version('transformer-engine')})\n")


def test_model_info_list(capsys):
    assert cli.main(["model-info", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 13
    assert lines[1] == "tanuki-8x8b              moe            46,973,325,312 parameters"
    assert lines[7] == "tanuki-vision-8x8b-tiny  vision+moe          9,009,440 parameters"
    assert [ln.split()[0] for ln in lines] == [
        "tanuki-8b", "tanuki-8x8b", "tanuki-8b-tiny", "tanuki-8x8b-tiny",
        "tanuki-vision-8b", "tanuki-vision-8x8b", "tanuki-vision-8b-tiny", "tanuki-vision-8x8b-tiny",
        "nemotron4-340b", "nemotron4-340b-reward", "nemotron4-15b", "nemotron4-tiny", "nemotron4-tiny-reward"]
    assert lines[8] == "nemotron4-340b           dense         341,029,195,776 parameters"
    assert cli.main(["model-info", "--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[1] == {"preset": "tanuki-8x8b", "architecture": "moe", "total": 46973325312}


def test_model_info_needs_a_preset_or_list(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["model-info"])
    assert e.value.code == 2
    assert capsys.readouterr().err.endswith("tanuki: error: model-info: give a PRESET or --list\n")


def test_print_config_is_the_resolved_yaml_with_every_default():
    r = _tanuki("train", "--print-config", STAGE2, "train.lr=1e-4")
    assert r.returncode == 0, r.stderr
    assert r.stdout == load(STAGE2, ["train.lr=1e-4"]).to_yaml()
    assert "  lr: 0.0001\n" in r.stdout and "  adam_eps: 1.0e-08\n" in r.stdout  # a default, filled in
    r2 = _tanuki("train", STAGE2, "--print-config", "train.lr=1e-4")  # overrides before or after options
    assert r2.returncode == 0 and r2.stdout == r.stdout


def test_a_config_without_a_preset_fails_naming_the_key_and_the_file(tmp_path):
    p = tmp_path / "forgot.yaml"
    p.write_text("".join(ln for ln in open(STAGE2, encoding="utf-8") if not ln.strip().startswith("preset:")))
    r = _tanuki("train", str(p))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"tanuki train: error: {p}: model.preset is required (one of the names `tanuki "
                        f"model-info --list` prints, e.g. tanuki-8x8b)\n")


def test_nproc_under_a_launcher_warns(tmp_path):
    """Under torchrun (RANK set) --nproc is not obeyed, and rank 0 says so; the rank's user error
    (an unknown preset) is one line."""
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    r = _tanuki("train", STAGE2, "--nproc", "2", "model.preset=tanuki-70b", f"checkpoint.dir={tmp_path}", env=env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        "tanuki train: warning: --nproc 2 ignored: this process is rank 0 of 1 started by torchrun",
        "tanuki train: error: KeyError: unknown preset 'tanuki-70b'; known presets: nemotron4-15b, nemotron4-340b, "
        "nemotron4-340b-reward, nemotron4-tiny, nemotron4-tiny-reward, tanuki-8b, tanuki-8b-tiny, "
        "tanuki-8x8b, tanuki-8x8b-tiny, tanuki-vision-8b, tanuki-vision-8b-tiny, tanuki-vision-8x8b, "
        "tanuki-vision-8x8b-tiny",
    ]
    assert os.listdir(tmp_path) == []  # a user error leaves no crash log


def test_launcher_rank_reads_torchrun_and_srun_steps():
    from megatron_tanuki.runtime.spawn import launcher_rank

    assert launcher_rank({}) is None
    assert launcher_rank({"RANK": "3"}) == "3"
    assert launcher_rank({"SLURM_PROCID": "5"}) is None  # an sbatch batch script, not an srun step
    assert launcher_rank({"SLURM_PROCID": "5", "SLURM_STEP_ID": "0"}) == "5"


def _embedding_out_of_range():
    torch.nn.functional.embedding(torch.tensor([7]), torch.zeros(4, 2))


def test_a_crash_keeps_its_traceback_beside_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TANUKI_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    try:
        _embedding_out_of_range()
    except IndexError as e:
        code = crash.report("tanuki x", e, str(tmp_path / "run"))
    assert code == 1
    (log,) = os.listdir(tmp_path / "run")
    path = str(tmp_path / "run" / log)
    assert log.startswith("tanuki-crash-") and log.endswith(".log")
    assert capsys.readouterr().err == (f"tanuki x: internal error: IndexError: index out of range in self "
                                       f"(traceback in {path}; TANUKI_DEBUG=1 prints it)\n")
    text = open(path, encoding="utf-8").read()
    assert "Traceback (most recent call last)" in text and "_embedding_out_of_range" in text
    monkeypatch.setenv("TANUKI_DEBUG", "1")
    try:
        _embedding_out_of_range()
    except IndexError as e:
        assert crash.report("tanuki x", e, str(tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "in _embedding_out_of_range" in err


def test_a_user_error_is_one_line_and_leaves_no_file(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  mode: sft\n  lr: fast\n")
    with pytest.raises(ValueError) as e:
        load(str(p))
    assert crash.report("tanuki train", e.value, str(tmp_path / "run")) == 2
    assert capsys.readouterr().err == f"tanuki train: error: {p}: train.lr must be a number, got 'fast'\n"
    assert not os.path.exists(tmp_path / "run")
    # A ValueError raised by a `raise` inside a library, not one of ours, is a crash.
    with pytest.raises(ValueError) as e:
        json.loads("{")
    assert crash.user_message(e.value) is None


def _crash_on_rank_1():
    if os.environ["RANK"] == "1":
        _embedding_out_of_range()
    return "fine"


def _config_error_on_rank_1(path):
    if os.environ["RANK"] == "1":
        load(path)
    return "fine"


def test_a_rank_is_judged_where_its_traceback_lived(tmp_path, capsys, monkeypatch):
    """Spawned ranks: a crash keeps every failing rank's traceback; a user error on a rank is
    still one line."""
    monkeypatch.delenv("TANUKI_DEBUG", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RankFailed) as e:
        run_ranks(_crash_on_rank_1, 2)
    assert e.value.user_message is None and e.value.first_error == "rank 1: IndexError: index out of range in self"
    assert crash.report("tanuki train", e.value, str(tmp_path)) == 1
    (log,) = os.listdir(tmp_path)
    assert capsys.readouterr().err == (f"tanuki train: internal error: rank 1: IndexError: index out of range in "
                                       f"self (traceback in {tmp_path / log}; TANUKI_DEBUG=1 prints it)\n")
    assert "--- rank 1 ---" in open(tmp_path / log, encoding="utf-8").read()

    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  mode: sft\n  lr: fast\n")
    with pytest.raises(RankFailed) as e:
        run_ranks(_config_error_on_rank_1, 2, str(p))
    assert e.value.user_message == f"{p}: train.lr must be a number, got 'fast'"
    assert crash.report("tanuki train", e.value, str(tmp_path / "other")) == 2
    assert capsys.readouterr().err == f"tanuki train: error: {p}: train.lr must be a number, got 'fast'\n"


def test_train_refuses_nemotron4(tmp_path):
    """Nemotron-4 is a teacher here (generate / serve / score-reward); training it is refused by name."""
    r = _tanuki("train", STAGE2, "model.preset=nemotron4-tiny", f"checkpoint.dir={tmp_path}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "tanuki train: error: ConfigError: train.mode vlm_stage2 is not for nemotron4-tiny (nemotron4 is not "
        "trained by tanuki train)")


def test_fp8_serving_is_refused_without_te_and_reaches_the_config(tmp_path):
    """--fp8 (Nemotron-4-340B on one node of 8 H100) needs TE on GPUs: refused up front here. The GPU
    branch's config is built on CPU: FP8 compute with FP8 weights (fp8_param) and bf16 elsewhere."""
    from megatron_tanuki.models.registry import get_preset
    from megatron_tanuki.models.tanuki.builder import BuildOptions, transformer_config
    from megatron_tanuki.runtime.distributed import ParallelLayout

    r = _tanuki("serve", "--ckpt", str(tmp_path), "--fp8", "e4m3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "tanuki serve: error: --fp8 e4m3: FP8 needs Transformer Engine on a GPU (pip install "
        "megatron_tanuki[te]); this machine has no GPU")
    opts = BuildOptions(dtype="bf16", fp8="e4m3", fp8_param=True, perform_initialization=False)
    tcfg = transformer_config(get_preset("nemotron4-tiny"), ParallelLayout(), opts, use_te=True)
    assert (tcfg.fp8, tcfg.fp8_param, tcfg.params_dtype, tcfg.layernorm_zero_centered_gamma) == \
        ("e4m3", True, __import__("torch").bfloat16, True)
    with pytest.raises(ValueError, match=r"^FP8 needs Transformer Engine on a GPU"):
        opts.validate(use_te=False)
