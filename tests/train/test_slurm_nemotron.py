"""slurm/serve_nemotron4_340b.sh: slurm/serve.sh with Nemotron-4-340B's layout per MODE and its chat template.

DRY_RUN=1 prints the launch for each MODE; a wrong allocation, a layout flag, an unknown MODE, FP8 under LOCAL=1
and a missing checkpoint are refused (exit 2) before anything starts; SIGTERM still reaches the ranks
through Slurm (stand-in srun/scancel, as in test_slurm.py); LOCAL=1 serves the tiny Nemotron-4 converted
from the NeMo zarr fixture on 2 CPU ranks with the nemotron4 template.
"""
import os
import signal
import subprocess

from tests.train.test_slurm import KEY, ROOT, SLURM_ENV, _fake_slurm, serving_locally, sh, srun_lines, term_when_ready

SCRIPT = "serve_nemotron4_340b.sh"
PY = f"{ROOT}/.venv/bin/python"


def _env(tmp_path, **extra):
    return {**SLURM_ENV, "SLURM_JOB_NODELIST": "gpu-a[01-02]", "LOG_DIR": str(tmp_path / "logs"),
            "TANUKI_API_KEY": KEY, "DRY_RUN": "1", **extra}


def _srun(tmp_path, nodes, ckpt, tp, pp, tail="", precision="--dtype bf16"):
    return (f"srun --nodes={nodes} --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 --kill-on-bad-exit=1 "
            f"--output={tmp_path}/logs/%x-%j-serve.out {PY} -m megatron_tanuki.cli serve --ckpt {ckpt} "
            f"--tp {tp} --pp {pp} --host 0.0.0.0 --port 8000 --chat nemotron4 {precision}{tail}")


def test_dry_run_h100x2_is_two_nodes_tp8_pp2(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    r = sh(SCRIPT, str(ckpt), "--served-model-name", "nemotron4-340b-instruct", env=_env(tmp_path))
    assert r.returncode == 0, r.stderr
    (cmd,) = srun_lines(r.stdout)
    assert cmd.rstrip() == _srun(tmp_path, 2, ckpt, 8, 2, " --served-model-name nemotron4-340b-instruct")
    assert "[slurm] layout TP=8 PP=2 EP=1 on 2 node(s) x 8 GPU(s)" in r.stderr
    assert KEY not in r.stdout + r.stderr
    header = open(os.path.join(ROOT, "slurm", SCRIPT)).read()
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=TERM@120", "--output=%x-%j.out"):
        assert f"#SBATCH {flag}\n" in header
    assert "#SBATCH --requeue" not in header


def test_dry_run_h200_is_one_node_tp8(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    r = sh(SCRIPT, str(ckpt), env=_env(tmp_path, MODE="h200", SLURM_JOB_NUM_NODES="1"))
    assert r.returncode == 0, r.stderr
    (cmd,) = srun_lines(r.stdout)
    assert cmd.rstrip() == _srun(tmp_path, 1, ckpt, 8, 1)
    assert "[slurm] layout TP=8 PP=1 EP=1 on 1 node(s) x 8 GPU(s)" in r.stderr


def test_dry_run_without_an_allocation_prints_the_modes_own(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = {"LOG_DIR": str(tmp_path / "logs"), "TANUKI_API_KEY": KEY, "DRY_RUN": "1"}  # no SLURM_*
    for mode, nodes, pp, precision in (("h100x2", 2, 2, "--dtype bf16"), ("h200", 1, 1, "--dtype bf16"),
                                       ("h100-fp8", 1, 1, "--fp8 e4m3")):
        r = sh(SCRIPT, str(ckpt), env={**env, "MODE": mode})
        assert r.returncode == 0, r.stderr
        assert srun_lines(r.stdout)[0].rstrip() == _srun(tmp_path, nodes, ckpt, 8, pp, precision=precision)
        assert f"[slurm] no Slurm allocation: printing the launch as `sbatch --nodes={nodes}` would run it" in r.stderr
    # not a dry run: nothing to launch on
    r = sh(SCRIPT, str(ckpt), env={**env, "DRY_RUN": "0"})
    assert r.returncode == 2 and not srun_lines(r.stdout)
    assert ("[slurm] no Slurm allocation: submit it (MODE=h100x2 sbatch --nodes=2 slurm/serve_nemotron4_340b.sh "
            "CKPT), or print the launch with DRY_RUN=1, or run it here on CPU with LOCAL=1") in r.stderr


def test_refusals_before_anything_starts(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    # the allocation must be the mode's
    r = sh(SCRIPT, str(ckpt), env=_env(tmp_path, MODE="h200"))  # SLURM_ENV: 2 nodes
    assert r.returncode == 2 and not srun_lines(r.stdout)
    assert ("[slurm] MODE=h200 runs on 1 node(s) x 8 GPUs; this job has 2 node(s) x 8 GPU(s): submit it as "
            "MODE=h200 sbatch --nodes=1 --gpus-per-node=8 slurm/serve_nemotron4_340b.sh CKPT") in r.stderr
    r = sh(SCRIPT, str(ckpt), env=_env(tmp_path, SLURM_GPUS_ON_NODE="4"))
    assert r.returncode == 2 and "this job has 2 node(s) x 4 GPU(s)" in r.stderr
    # the layout is the mode's
    r = sh(SCRIPT, str(ckpt), "--pp=1", env=_env(tmp_path))
    assert r.returncode == 2 and not srun_lines(r.stdout)
    assert ("[slurm] MODE=h100x2 fixes the layout (TP=8 PP=2); --pp is not taken here: use slurm/serve.sh for "
            "another layout") in r.stderr
    # FP8 needs TE on GPUs: not on this CPU
    r = sh(SCRIPT, str(ckpt), env={**_env(tmp_path, MODE="h100-fp8"), "LOCAL": "1"})
    assert r.returncode == 2 and not srun_lines(r.stdout)
    assert ("[slurm] MODE=h100-fp8 needs Transformer Engine FP8 on GPUs: LOCAL=1 cannot run it (try MODE=h100x2 "
            "or h200)") in r.stderr
    r = sh(SCRIPT, str(ckpt), env=_env(tmp_path, MODE="h100x4"))
    assert r.returncode == 2 and "[slurm] MODE=h100x4: expected h100x2 (default), h200 or h100-fp8" in r.stderr
    # usage and a missing checkpoint
    r = sh(SCRIPT, env=_env(tmp_path))
    assert r.returncode == 2
    assert ("usage: [MODE=h100x2|h200|h100-fp8] slurm/serve_nemotron4_340b.sh CKPT [tanuki serve options ...]"
            in r.stderr)
    r = sh(SCRIPT, str(tmp_path / "nope"), env=_env(tmp_path))
    assert r.returncode == 2 and not srun_lines(r.stdout)
    assert f"[slurm] checkpoint {tmp_path}/nope: no such file or folder" in r.stderr
    # serve.sh's key rule holds here too
    r = sh(SCRIPT, str(ckpt), env=_env(tmp_path, TANUKI_API_KEY=""))
    assert r.returncode == 2 and "[slurm] refusing to serve on 0.0.0.0 without an API key" in r.stderr


def test_local_dry_run_shrinks_the_modes_split_to_two_cpu_ranks(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = {"LOCAL": "1", "DRY_RUN": "1", "LOG_DIR": str(tmp_path / "logs")}
    for mode, split in (("h100x2", "--tp 1 --pp 2"), ("h200", "--tp 2 --pp 1")):
        r = sh(SCRIPT, str(ckpt), "--tokenizer", "t.model", env={**env, "MODE": mode})
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1].rstrip() == (
            f"{PY} -m megatron_tanuki.cli serve --ckpt {ckpt} {split} --port 8000 --chat nemotron4 --tokenizer t.model")


def test_sigterm_reaches_the_ranks_through_slurm(tmp_path):
    """The script execs serve.sh: SIGTERM to the batch shell becomes `scancel --signal=TERM`, never srun's."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({**_env(tmp_path, DRY_RUN="0"), **_fake_slurm(tmp_path), "FAKE_SRUN": "serve"})
    proc, out, err = term_when_ready(SCRIPT, str(ckpt), env=env, ready=tmp_path / "ready")
    assert proc.returncode == 0, out + err
    log = (tmp_path / "log").read_text().splitlines()
    assert log[0] == "ranks: " + _srun(tmp_path, 2, ckpt, 8, 2)[len("srun "):] + f" key={KEY}"
    assert log[1:] == ["scancel --signal=TERM 4242", "drained"]


def test_local_serves_the_tiny_nemotron4_with_its_template(tmp_path):
    """LOCAL=1 on the tiny Nemotron-4 converted from the NeMo zarr fixture (PP=2 on 2 CPU ranks): a chat
    completion's prompt is the nemotron4 rendering; SIGTERM drains it (exit 0)."""
    import json
    import urllib.request

    import sentencepiece as spm

    from megatron_tanuki.runtime.spawn import free_port
    from tests.unit.tiny_spm import make_nemotron_spm

    ck = tmp_path / "ck"
    tanuki = os.path.join(os.path.dirname(os.path.abspath(PY)), "tanuki")
    r = subprocess.run([tanuki, "convert", "nemo-to-mcore", "--nemo", os.path.join(ROOT, "tests/data/nemo-zarr-tiny"),
                        "--out", str(ck)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    tok = make_nemotron_spm(tmp_path)
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "TANUKI_API_KEY", "TANUKI_DEBUG", "MODE")}
    env.update({"LOCAL": "1", "PORT": str(port), "OMP_NUM_THREADS": "1", "LOG_DIR": str(tmp_path / "logs")})
    with serving_locally(SCRIPT, str(ck), "--tokenizer", tok, "--kv-memory-gb", "0.05", "--shutdown-grace", "5",
                         env=env, log_path=tmp_path / "serve.log", port=port) as proc:
        prompt = "what is the capital of Japan"
        body = json.dumps({"model": "ck", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=30)
    text = open(tmp_path / "serve.log").read()
    assert rc == 0, text[-3000:]
    assert "[slurm] MODE=h100x2 on this machine: --tp 1 --pp 2 (2 CPU ranks)" in text
    rendered = f"<extra_id_0>System\n\n<extra_id_1>User\n{prompt}\n<extra_id_1>Assistant\n"  # issue 12's template
    assert answer["usage"]["prompt_tokens"] == len(spm.SentencePieceProcessor(model_file=tok).encode(rendered))
    assert answer["usage"]["completion_tokens"] <= 4
