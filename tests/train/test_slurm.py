"""slurm/*.sh: DRY_RUN=1 prints the launch (as sbatch would run it); LOCAL=1 runs the tiny config;
the requeue rules of common.sh run against stand-in srun/scontrol executables (there is no Slurm
here: the batch-side shell logic is what is under test, with real processes and real signals)."""
import contextlib
import glob
import os
import re
import signal
import stat
import subprocess
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "h100-[07-08]",
             "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": ROOT}


def sh(script, *args, env=None, cwd="/"):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(env or {})
    return subprocess.run(["bash", os.path.join(ROOT, "slurm", script), *args], capture_output=True, text=True,
                          env=full, cwd=cwd, timeout=900)


def srun_lines(stdout):
    return [ln for ln in stdout.strip().splitlines() if ln.startswith("srun ")]


def test_vlm_8x8b_dry_run_prints_both_stages_for_two_nodes(tmp_path):
    # run from another folder, as sbatch runs a spooled copy: the checkout comes from SLURM_SUBMIT_DIR
    logs = tmp_path / "no" / "logs"
    r = sh("vlm_8x8b.sh", "train.global_batch_size=256", env={**SLURM_ENV, "DRY_RUN": "1", "LOG_DIR": str(logs)})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("export CUDA_DEVICE_MAX_CONNECTIONS=1")
    s1, s2 = srun_lines(r.stdout)
    for cmd in (s1, s2):
        assert "--nodes=2 --ntasks-per-node=8 --gpus-per-node=8" in cmd
        assert f"{ROOT}/.venv/bin/python -m megatron_tanuki.train" in cmd
        assert cmd.rstrip().endswith("train.global_batch_size=256")  # user overrides reach both stages
        assert "ssh" not in cmd and "h100-07" not in cmd  # rendezvous comes from SLURM_* in the ranks
    assert "examples/tanuki_8x8b_vlm_stage1.yaml model.init_checkpoint=ckpt/tanuki-vision-8x8b" in s1
    assert "parallel.tp=1 parallel.pp=1 parallel.ep=8 checkpoint.dir=runs/vlm_8x8b/stage1" in s1
    assert "examples/tanuki_8x8b_vlm_stage2.yaml parallel.tp=1 parallel.pp=2 parallel.ep=8 parallel.sp=false" in s2
    assert "model.init_checkpoint=runs/vlm_8x8b/stage1 checkpoint.dir=runs/vlm_8x8b/stage2" in s2
    # the steps' logs go to a folder the script creates at run time, one file per job and stage
    assert f"--output={logs}/%x-%j-stage1.out" in s1 and f"--output={logs}/%x-%j-stage2.out" in s2
    assert logs.is_dir()
    header = open(os.path.join(ROOT, "slurm", "vlm_8x8b.sh")).read()
    for flag in ("--nodes=2", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@300", "--output=%x-%j.out"):
        assert f"#SBATCH {flag}" in header


def test_no_sbatch_header_names_a_folder_for_its_output():
    # Slurm does not create the folder of --output/--error: a missing one kills the job unseen
    scripts = sorted(glob.glob(os.path.join(ROOT, "slurm", "*.sh")))
    assert len(scripts) >= 4
    for path in scripts:
        for line in open(path):
            m = re.match(r"#SBATCH\s+(--output|--error|-o|-e)[=\s]+(\S+)", line)
            if m:
                assert "/" not in m.group(2), f"{path}: {line.strip()}"


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


@pytest.mark.parametrize("alloc,per_node,note", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "2"}, 4, False),  # the GPUs Slurm gave the node win
    ({"SLURM_NTASKS_PER_NODE": "2"}, 2, False),
    ({}, 8, True),
    ({"GPUS_PER_NODE": "6"}, 6, True),  # the environment default only when the allocation says nothing
    ({"SLURM_GPUS_ON_NODE": "4", "GPUS_PER_NODE": "6"}, 4, False),
])
def test_ranks_per_node_come_from_the_allocation(alloc, per_node, note):
    env = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_GPUS_ON_NODE"}
    r = sh("sft.sh", "examples/tanuki_8b_sft.yaml", env={**env, **alloc, "DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    (cmd,) = srun_lines(r.stdout)
    assert f"--nodes=2 --ntasks-per-node={per_node} --gpus-per-node={per_node} " in cmd
    message = "[slurm] neither SLURM_GPUS_ON_NODE nor SLURM_NTASKS_PER_NODE is set: "
    assert (message in r.stderr) == note
    if note:
        assert f"{message}{per_node} ranks per node" in r.stderr


def test_pretrain_local_dry_run_makes_and_trains_on_an_indexed_blend():
    r = sh("llm_8x8b_pretrain.sh", env={"LOCAL": "1", "DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    assert ("preprocess-data --input runs/local/pretrain/data/text.jsonl --output-prefix runs/local/pretrain/data/text"
            in r.stdout)
    assert "train examples/tanuki_8x8b_pretrain.yaml" in r.stdout
    assert "data.blend=\\[runs/local/pretrain/data/text\\]" in r.stdout and "train.eval_interval=2" in r.stdout


def test_vlm_8x8b_local_dry_run_uses_its_own_folder():
    r = sh("vlm_8x8b.sh", env={"LOCAL": "1", "DRY_RUN": "1"})
    assert r.returncode == 0, r.stderr
    assert "demo --data-only --workdir runs/local/vlm_8x8b" in r.stdout
    assert "checkpoint.dir=runs/local/vlm_8x8b/stage1" in r.stdout
    assert "model.init_checkpoint=runs/local/vlm_8x8b/stage1 checkpoint.dir=runs/local/vlm_8x8b/stage2" in r.stdout
    assert "runs/vlm_8x8b" not in r.stdout


def _saved_run(folder, preset, mode, step=2, finished=True):
    ckpt = folder / f"iter_{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(yaml.safe_dump({"model": {"preset": preset}, "train": {"mode": mode}}))
    (folder / "latest").write_text(f"iter_{step:07d}\n")
    if finished:
        (folder / "finished").write_text(f"{step}\n")


def test_dry_run_refuses_a_run_folder_saved_by_another_model(tmp_path):
    _saved_run(tmp_path / "stage1", "tanuki-vision-8x8b-tiny", "vlm_stage1")
    r = sh("vlm_8x8b.sh", env={**SLURM_ENV, "DRY_RUN": "1", "RUN": str(tmp_path)})
    assert r.returncode == 1
    assert "stage 1 already finished" not in r.stdout and not srun_lines(r.stdout)
    assert (f"error: run folder {tmp_path}/stage1 holds a checkpoint of model.preset=tanuki-vision-8x8b-tiny "
            f"train.mode=vlm_stage1") in r.stderr
    assert "but this run asks for model.preset=tanuki-vision-8x8b train.mode=vlm_stage1" in r.stderr
    assert f"[slurm] refusing to skip or resume {tmp_path}/stage1" in r.stderr
    # the same folder saved by the cluster model is skipped as finished; stage 2 (a vlm_stage1 checkpoint
    # where vlm_stage2 is asked) is refused before its launch
    (tmp_path / "stage1" / "iter_0000002" / "config.yaml").write_text(
        yaml.safe_dump({"model": {"preset": "tanuki-vision-8x8b"}, "train": {"mode": "vlm_stage1"}}))
    _saved_run(tmp_path / "stage2", "tanuki-vision-8x8b", "vlm_stage1", finished=False)
    r = sh("vlm_8x8b.sh", env={**SLURM_ENV, "DRY_RUN": "1", "RUN": str(tmp_path)})
    assert r.returncode == 1 and f"stage 1 already finished: {tmp_path}/stage1" in r.stdout
    assert "but this run asks for model.preset=tanuki-vision-8x8b train.mode=vlm_stage2" in r.stderr
    assert not srun_lines(r.stdout)


FAKE_SRUN = r"""#!/bin/bash
# stand-in for srun: FAKE_SRUN says what the ranks do; their run folder is the last checkpoint.dir=
for a in "$@"; do [[ $a == checkpoint.dir=* ]] && dir=${a#checkpoint.dir=}; done
save() { mkdir -p "$dir"; echo "iter_000000$1" > "$dir/latest"; }
case $FAKE_SRUN in
  fail) exit 1 ;;
  save-then-fail) save 5; exit 1 ;;
  finish) save 5; echo 5 > "$dir/finished"; exit 0 ;;
  checkpoint-on-usr1) trap 'echo usr1 >> "$FAKE_LOG"; save 7; exit 0' USR1 ;;
  ignore-usr1) trap 'echo usr1 >> "$FAKE_LOG"' USR1 ;;
  # a server's ranks: srun itself must not be signalled (it turns SIGTERM into SIGKILL of the ranks);
  # USR2 stands for the SIGTERM Slurm delivers to the ranks, which drain and exit 0
  serve) echo "ranks: $* key=$TANUKI_API_KEY" >> "$FAKE_LOG"
         trap 'echo "srun got TERM" >> "$FAKE_LOG"; exit 1' TERM; trap 'echo drained >> "$FAKE_LOG"; exit 0' USR2 ;;
esac
echo $$ > "$FAKE_READY.tmp" && mv "$FAKE_READY.tmp" "$FAKE_READY"
while :; do sleep 0.1; done
"""
FAKE_SCONTROL = r"""#!/bin/bash
case $1 in
  requeue) echo "requeue $2" >> "$FAKE_LOG" ;;
  show) printf '%s\n' gpu-a01 gpu-a02 gpu-a05 gpu-b10 gpu-b11 ;;
esac
"""
FAKE_SCANCEL = r"""#!/bin/bash
echo "scancel $*" >> "$FAKE_LOG"
[[ -f $FAKE_READY ]] && kill -USR2 "$(cat "$FAKE_READY")"
"""


def _fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"),
            "FAKE_READY": str(tmp_path / "ready"), "LOG_DIR": str(tmp_path / "logs")}


def test_master_addr_comes_from_scontrol(tmp_path):
    env = {**SLURM_ENV, **_fake_slurm(tmp_path), "SLURM_JOB_NODELIST": "gpu-a[01-02,05],gpu-b[10-11]", "DRY_RUN": "1"}
    r = sh("sft.sh", "examples/tanuki_8b_sft.yaml", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].endswith(" MASTER_ADDR=gpu-a01")


@pytest.mark.parametrize("ranks,signals,rc,requeued,message", [
    ("fail", [], 1, False, "[slurm] sft failed (exit 1) without a new checkpoint or SIGUSR1: not requeued"),
    ("save-then-fail", [], 1, True, "[slurm] requeueing job 4242: sft failed (exit 1) after saving iter_0000005 "
                                    "in this job"),
    ("finish", [], 0, False, None),
    ("checkpoint-on-usr1", ["USR1"], 0, True, "[slurm] requeueing job 4242: {run} is not finished"),
    # the checkpoint overruns the window: requeued before Slurm's SIGTERM, the ranks stopped
    ("ignore-usr1", ["USR1"], 143, True, "[slurm] requeueing job 4242: the ranks were still running 1 s after "
                                         "SIGUSR1 (checkpoint overran the window)"),
    ("checkpoint-on-usr1", ["TERM"], 143, False, "[slurm] SIGTERM without SIGUSR1 (scancel or preemption): "
                                                 "not requeued by this script"),
])
def test_requeue_rules(tmp_path, ranks, signals, rc, requeued, message):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({**SLURM_ENV, **_fake_slurm(tmp_path), "FAKE_SRUN": ranks, "RUN": str(run), "REQUEUE_GRACE": "1"})
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "slurm", "sft.sh"), "examples/tanuki_8b_sft.yaml"],
                            env=env, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = tmp_path / "ready"
    try:
        if signals:
            deadline = time.time() + 60
            while not ready.exists():
                assert proc.poll() is None and time.time() < deadline, proc.communicate()
                time.sleep(0.05)
            for sig in signals:
                proc.send_signal(getattr(signal, f"SIG{sig}"))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        if ready.exists():  # the stand-in srun, if the script left it running
            try:
                os.kill(int(ready.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == rc, out + err
    log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
    assert log.count("requeue 4242") == (1 if requeued else 0), log + err
    assert ("usr1" in log) == ("USR1" in signals)  # forwarded to srun
    if message:
        assert message.format(run=run) in err


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
    # the cluster run pointed at the tiny run's folder refuses it instead of starting stage 2 from it
    r = sh("vlm_8x8b.sh", env={**SLURM_ENV, "DRY_RUN": "1", "RUN": str(run)})
    assert r.returncode == 1 and "stage 1 already finished" not in r.stdout and not srun_lines(r.stdout)
    assert (f"run folder {run}/stage1 holds a checkpoint of model.preset=tanuki-vision-8x8b-tiny "
            f"train.mode=vlm_stage1") in r.stderr


# --- slurm/serve.sh: one `tanuki serve` over the allocation ------------------------------------
KEY = "sk-tanuki-test-0123456789"


def _serve_env(tmp_path, **extra):
    fake = _fake_slurm(tmp_path) if not (tmp_path / "bin").exists() else {
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_LOG": str(tmp_path / "log"),
        "FAKE_READY": str(tmp_path / "ready"), "LOG_DIR": str(tmp_path / "logs")}
    return {**SLURM_ENV, **fake, "SLURM_JOB_NODELIST": "gpu-a[01-02]", **extra}


def test_serve_dry_run_two_nodes_takes_the_key_from_the_environment(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    r = sh("serve.sh", str(ckpt), "--served-model-name", "tanuki-8x8b", "--max-concurrency", "64",
           env=_serve_env(tmp_path, DRY_RUN="1", TANUKI_API_KEY=KEY))
    assert r.returncode == 0, r.stderr
    (cmd,) = srun_lines(r.stdout)
    assert cmd.rstrip() == (
        f"srun --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 --kill-on-bad-exit=1 "
        f"--output={tmp_path}/logs/%x-%j-serve.out {ROOT}/.venv/bin/python -m megatron_tanuki.cli serve "
        f"--ckpt {ckpt} --tp 8 --pp 2 --host 0.0.0.0 --port 8000 --served-model-name tanuki-8x8b --max-concurrency 64")
    assert r.stdout.splitlines()[0].endswith(" MASTER_ADDR=gpu-a01")  # the ranks' rendezvous: the first node
    assert "[slurm] tanuki serve: http://gpu-a01:8000/v1 once loaded" in r.stderr
    assert "[slurm] layout TP=8 PP=2 EP=1 on 2 node(s) x 8 GPU(s)" in r.stderr
    assert KEY not in r.stdout + r.stderr and "--api-key" not in cmd  # the ranks read TANUKI_API_KEY

    # TP=/PP=/EP=/PORT= from the environment; a flag wins over its variable; EP alone shrinks the default TP
    r = sh("serve.sh", str(ckpt), "--pp=1", "--chat", "tanuki",
           env=_serve_env(tmp_path, DRY_RUN="1", TANUKI_API_KEY=KEY, EP="8", PP="2", PORT="9001"))
    assert r.returncode == 0, r.stderr
    (cmd,) = srun_lines(r.stdout)
    assert cmd.rstrip().endswith(f"serve --ckpt {ckpt} --tp 1 --pp 1 --ep 8 --host 0.0.0.0 --port 9001 --chat tanuki")
    assert "http://gpu-a01:9001/v1" in r.stderr

    # LOCAL=1: this machine, the CLI's loopback default, no key needed
    env = {"LOCAL": "1", "DRY_RUN": "1", "TP": "2", "LOG_DIR": str(tmp_path / "logs")}
    r = sh("serve.sh", str(ckpt), "--nproc", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].rstrip() == (f"{ROOT}/.venv/bin/python -m megatron_tanuki.cli serve --ckpt {ckpt} "
                                                  f"--tp 2 --port 8000 --nproc 2")
    assert "[slurm] tanuki serve: http://127.0.0.1:8000/v1 once loaded" in r.stderr

    header = open(os.path.join(ROOT, "slurm", "serve.sh")).read()
    assert "#SBATCH --signal=TERM@120" in header and "#SBATCH --requeue" not in header


def test_serve_refuses_a_public_bind_without_a_key(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = _serve_env(tmp_path, DRY_RUN="1", TANUKI_API_KEY="")  # empty: no key, whatever the caller's environment
    r = sh("serve.sh", str(ckpt), env=env)
    assert r.returncode == 2 and not srun_lines(r.stdout)
    assert ("[slurm] refusing to serve on 0.0.0.0 without an API key: export TANUKI_API_KEY=... before sbatch "
            "(it reaches the ranks through the environment, never the command line or the log), or give "
            "--host 127.0.0.1 (the first node only)") in r.stderr
    # a key on the command line would land in `scontrol show job` and the log: refused, and not echoed
    r = sh("serve.sh", str(ckpt), "--api-key", KEY, env=env)
    assert r.returncode == 2 and not srun_lines(r.stdout) and KEY not in r.stdout + r.stderr
    assert "[slurm] refusing --api-key on the command line" in r.stderr
    # loopback (the first node only) needs no key
    r = sh("serve.sh", str(ckpt), "--host", "127.0.0.1", env=env)
    assert r.returncode == 0 and "--host 127.0.0.1 --port 8000" in srun_lines(r.stdout)[0], r.stderr
    assert "[slurm] tanuki serve: http://127.0.0.1:8000/v1 on gpu-a01 only" in r.stderr
    # usage and a missing checkpoint: before anything else
    r = sh("serve.sh", env=env)
    assert r.returncode == 2 and "usage: slurm/serve.sh CKPT" in r.stderr
    r = sh("serve.sh", str(tmp_path / "nope"), env={**env, "TANUKI_API_KEY": KEY})
    assert r.returncode == 2 and f"[slurm] checkpoint {tmp_path}/nope: no such file or folder" in r.stderr


def term_when_ready(script, *args, env, ready):
    """Start slurm/SCRIPT with the stand-in srun; once the fake ranks wrote ``ready`` (their pid), send
    SIGTERM to the batch shell (scancel --batch, or a kill of it); (process, stdout, stderr). The fake
    ranks are killed whatever happens."""
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "slurm", script), *args], env=env, cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        if ready.exists():
            try:
                os.kill(int(ready.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    return proc, out, err


def test_serve_sigterm_reaches_the_ranks_through_slurm_not_srun(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(_serve_env(tmp_path, FAKE_SRUN="serve", TANUKI_API_KEY=KEY))
    proc, out, err = term_when_ready("serve.sh", str(ckpt), env=env, ready=tmp_path / "ready")
    assert proc.returncode == 0, out + err
    log = (tmp_path / "log").read_text().splitlines()
    # srun's arguments; the environment, not the command line, carries the key to the ranks
    assert log[0] == (f"ranks: --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 --kill-on-bad-exit=1 "
                      f"--output={tmp_path}/logs/%x-%j-serve.out {ROOT}/.venv/bin/python -m megatron_tanuki.cli serve "
                      f"--ckpt {ckpt} --tp 8 --pp 2 --host 0.0.0.0 --port 8000 key={KEY}")
    assert log[1:] == ["scancel --signal=TERM 4242", "drained"]  # never "srun got TERM"
    assert "[slurm] SIGTERM: passing it to the ranks (scancel --signal=TERM 4242)" in err
    assert "[slurm] tanuki serve exited with status 0" in err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving_locally(script, *args, env, log_path, port):
    """slurm/SCRIPT ARGS with LOCAL=1 in ``env`` (its own process group, output in ``log_path``), yielded
    once /health answers 200 on ``port`` (up to 120 s); killed on the way out if still running."""
    import urllib.request

    log = open(log_path, "w+")
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "slurm", script), *args],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, status = time.time() + 120, None
        while status != 200:
            assert proc.poll() is None, open(log_path).read()[-3000:]
            assert time.time() < deadline, "no /health within 120 s: " + open(log_path).read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    status = resp.status
            except OSError:
                time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_serve_local_answers_health_and_drains_on_sigterm(tmp_path):
    """LOCAL=1 on a tiny dense checkpoint: /health answers on loopback without a key; SIGTERM to the
    script's process group (the server is exec'd in its place) ends it with exit 0 within the grace."""
    import torch

    from megatron_tanuki.convert import engine
    from tests.convert import tiny_hf

    tiny_hf.save(tiny_hf.dense_model(0), str(tmp_path / "hf"), dtype=torch.float32)
    engine.hf_to_mcore(str(tmp_path / "hf"), str(tmp_path / "ck"))  # what `tanuki convert hf-to-mcore` runs
    port, grace = _free_port(), 5
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "TANUKI_API_KEY", "TANUKI_DEBUG")}
    env.update({"LOCAL": "1", "PORT": str(port), "OMP_NUM_THREADS": "1", "LOG_DIR": str(tmp_path / "logs")})
    with serving_locally("serve.sh", str(tmp_path / "ck"), "--kv-memory-gb", "0.05", "--shutdown-grace", str(grace),
                         env=env, log_path=tmp_path / "serve.log", port=port) as proc:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=grace + 20)
    text = open(tmp_path / "serve.log").read()
    assert rc == 0, text[-3000:]
    assert f"[slurm] tanuki serve: http://127.0.0.1:{port}/v1 once loaded" in text
    assert f"[tanuki] serve: SIGTERM: draining (up to {grace} s)" in text  # the server's own handler ran
