"""slurm/*.sh: DRY_RUN=1 prints the launch (as sbatch would run it); LOCAL=1 runs the tiny config."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "h100-[07-08]",
             "SLURM_SUBMIT_DIR": ROOT}


def sh(script, *args, env=None, cwd="/"):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(env or {})
    return subprocess.run(["bash", os.path.join(ROOT, "slurm", script), *args], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=900)


def test_vlm_8x8b_dry_run_prints_both_stages_for_two_nodes():
    # run from another folder, as sbatch runs a spooled copy: the checkout comes from SLURM_SUBMIT_DIR
    r = sh("vlm_8x8b.sh", "train.global_batch_size=256", env={**SLURM_ENV, "DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("export CUDA_DEVICE_MAX_CONNECTIONS=1")
    s1, s2 = [ln for ln in lines if ln.startswith("srun ")]
    for cmd in (s1, s2):
        assert "--nodes=2 --ntasks-per-node=8 --gpus-per-node=8" in cmd
        assert f"{ROOT}/.venv/bin/python -m megatron_tanuki.train" in cmd
        assert cmd.rstrip().endswith("train.global_batch_size=256")  # user overrides reach both stages
        assert "ssh" not in cmd and "h100-07" not in cmd  # rendezvous comes from SLURM_* in the ranks
    assert "examples/tanuki_8x8b_vlm_stage1.yaml model.init_checkpoint=ckpt/tanuki-vision-8x8b" in s1
    assert "parallel.tp=1 parallel.pp=1 parallel.ep=8 checkpoint.dir=runs/vlm_8x8b/stage1" in s1
    assert "examples/tanuki_8x8b_vlm_stage2.yaml parallel.tp=1 parallel.pp=2 parallel.ep=8 parallel.sp=false" in s2
    assert "model.init_checkpoint=runs/vlm_8x8b/stage1 checkpoint.dir=runs/vlm_8x8b/stage2" in s2
    assert "-%j-stage1.out" in s1 and "-%j-stage2.out" in s2  # logs per job and stage
    header = open(os.path.join(ROOT, "slurm", "vlm_8x8b.sh")).read()
    for flag in ("--nodes=2", "--gpus-per-node=8", "--requeue", "--signal=USR1@300", "--output=logs/%x-%j.out"):
        assert f"#SBATCH {flag}" in header


def test_other_scripts_dry_run():
    r = sh("sft.sh", "examples/tanuki_8b_sft.yaml", "train.epochs=1", env={**SLURM_ENV, "DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    assert "-m megatron_tanuki.train examples/tanuki_8b_sft.yaml checkpoint.dir=runs/tanuki_8b_sft train.epochs=1" \
        in r.stdout
    r = sh("llm_8x8b_pretrain.sh", env={**SLURM_ENV, "DRY_RUN": "1"})
    assert r.returncode == 0 and "examples/tanuki_8x8b_pretrain.yaml checkpoint.dir=runs/tanuki_8x8b_pretrain" in r.stdout
    r = sh("convert.sh", "mcore-to-hf", "--ckpt", "runs/x", "--out", "hf/x", env={**SLURM_ENV, "DRY_RUN": "1"})
    assert r.returncode == 0 and "-m megatron_tanuki.cli convert mcore-to-hf --ckpt runs/x --out hf/x" in r.stdout
    r = sh("convert.sh", env={"DRY_RUN": "1"})
    assert r.returncode == 2 and "usage: slurm/convert.sh" in r.stderr


def test_vlm_8x8b_runs_locally_on_two_cpu_ranks(tmp_path):
    run = tmp_path / "run"
    r = sh("vlm_8x8b.sh", env={"LOCAL": "1", "RUN": str(run), "STEPS": "2"}, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "tiny_vlm_stage1" not in r.stderr
    for stage in ("stage1", "stage2"):
        assert (run / stage / "latest").read_text().strip() == "iter_0000002"
        assert (run / stage / "finished").exists()
    assert "(vlm_stage1)" in r.stdout and "(vlm_stage2)" in r.stdout and "EP=2" in r.stdout
    # a second submission (requeue) finds stage 1 finished and resumes stage 2 from `latest`
    r = sh("vlm_8x8b.sh", env={"LOCAL": "1", "RUN": str(run), "STEPS": "2"}, cwd=ROOT)
    assert r.returncode == 0 and "stage 1 already finished" in r.stdout
    assert f"resumed from {run}/stage2/iter_0000002 at step 2" in r.stdout
