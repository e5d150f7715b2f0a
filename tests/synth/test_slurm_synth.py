"""slurm/synth_nemotron4.sh: the teacher behind `tanuki serve` (serve_nemotron4_340b.sh's MODEs) and
`tanuki synth run` against it, in one job.

DRY_RUN=1 prints the server's srun, the wait and the client for each MODE, with the slice of an array
job; what the script sets itself (--out, --base-url, ...) and a --shard inside an array job are refused,
as are the server launches serve_nemotron4_340b.sh refuses. LOCAL=1 serves a tiny dense checkpoint on
2 CPU ranks and runs a 6-conversation recipe against it: 6 records, exit 0, no process left behind; a
recipe whose teacher.chat is not the served template is refused before the server starts.
"""
import json
import signal
import os
import socket
import subprocess
import time

import psutil
import pytest

from tests.train.test_slurm import KEY, ROOT, sh

SCRIPT = "synth_nemotron4.sh"
PY = f"{ROOT}/.venv/bin/python"
NODES = {"h100x2": 2, "h200": 1, "h100-fp8": 1}
LAYOUT = {"h100x2": "--tp 8 --pp 2 --host 0.0.0.0 --port 8000 --chat nemotron4 --dtype bf16",
          "h200": "--tp 8 --pp 1 --host 0.0.0.0 --port 8000 --chat nemotron4 --dtype bf16",
          "h100-fp8": "--tp 8 --pp 1 --host 0.0.0.0 --port 8000 --chat nemotron4 --fp8 e4m3"}
TINY_RECIPE = """name: tiny_synth
count: 6
teacher: {name: tiny-dense, chat: tanuki}
seeds:
  topic: {source: topics.jsonl}
combine: product
sampling: {temperature: 0.7, top_p: 1.0, max_tokens: 4}
turns:
  - name: q1
    role: user
    allow_truncated: true
    prompt: [{role: user, content: "{topic}の問題を一つ作ってください。"}]
  - {name: a1, role: assistant, allow_truncated: true, prompt: [{role: user, content: "{q1}"}]}
  - name: q2
    role: user
    allow_truncated: true
    prompt:
      - {role: user, content: "{q1}"}
      - {role: assistant, content: "{a1}"}
      - {role: user, content: "追加の質問を一つ。"}
  - {name: a2, role: assistant, allow_truncated: true, prompt: [{role: user, content: "{q2}"}]}
"""
TOPICS = ["三角形", "確率", "整数", "関数", "数列", "ベクトル"]


def _env(tmp_path, mode="h100x2", **extra):
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": str(NODES[mode]), "SLURM_GPUS_ON_NODE": "8",
            "SLURM_JOB_NODELIST": "gpu-a[01-02]", "SLURMD_NODENAME": "gpu-a01", "SLURM_SUBMIT_DIR": ROOT,
            "MODE": mode, "TANUKI_API_KEY": KEY, "DRY_RUN": "1", "LOG_DIR": str(tmp_path / "logs"), **extra}


def _plan(tmp_path, mode, ckpt, recipe, out, client_tail="", serve_tail=""):
    """The DRY_RUN=1 output of a Slurm run: export, the server's srun (in the background), wait, client, stop."""
    url = "http://gpu-a01:8000/v1"
    return ["export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS=8",
            f"srun --nodes={NODES[mode]} --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 --kill-on-bad-exit=1 "
            f"--output={tmp_path}/logs/%x-%j-serve.out {PY} -m megatron_tanuki.cli serve --ckpt {ckpt} "
            f"{LAYOUT[mode]}{serve_tail} &",
            f"# wait until GET {url}/models answers 200 (at most 3600 s)",
            f"{PY} -m megatron_tanuki.cli synth run {recipe} --out {out} --backend openai --base-url {url} "
            f"--api-key-env TANUKI_API_KEY{client_tail}",
            "# stop the server: scancel --signal=TERM 4242 (the ranks drain and exit)"]


def _lines(stdout):
    return [ln.rstrip() for ln in stdout.strip().splitlines()]


@pytest.fixture()
def ckpt(tmp_path):
    (tmp_path / "ckpt").mkdir()
    return tmp_path / "ckpt"


def test_dry_run_prints_server_wait_and_client_for_each_mode(tmp_path, ckpt):
    for mode in NODES:
        env = {**_env(tmp_path, mode), "OMP_NUM_THREADS": "8"}
        r = sh(SCRIPT, str(ckpt), "/r/recipe.yaml", "/o/out", "--limit", "20", "--", "--served-model-name", "nemo",
               env=env)
        assert r.returncode == 0, r.stderr
        assert _lines(r.stdout) == _plan(tmp_path, mode, ckpt, "/r/recipe.yaml", "/o/out", " --limit 20",
                                         " --served-model-name nemo")
        assert f"[slurm] layout TP=8 PP={2 if mode == 'h100x2' else 1} EP=1 on {NODES[mode]} node(s)" in r.stderr
        assert KEY not in r.stdout + r.stderr
    # relative paths are from the folder the script starts in (sbatch: the submit folder)
    r = sh(SCRIPT, "ckpt", "recipe.yaml", "out", env={**_env(tmp_path), "OMP_NUM_THREADS": "8"}, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert _lines(r.stdout) == _plan(tmp_path, "h100x2", ckpt, tmp_path / "recipe.yaml", tmp_path / "out")
    header = open(os.path.join(ROOT, "slurm", SCRIPT)).read()
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@300",
                 "--output=%x-%j.out"):
        assert f"#SBATCH {flag}\n" in header


def test_dry_run_array_jobs_run_one_slice_each(tmp_path, ckpt):
    env = {**_env(tmp_path), "OMP_NUM_THREADS": "8"}
    for task, first, count, shard in (("3", "0", "16", "3/16"), ("0", "0", "16", "0/16"), ("6", "4", "4", "2/4")):
        array = {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_MIN": first, "SLURM_ARRAY_TASK_COUNT": count}
        r = sh(SCRIPT, str(ckpt), "/r.yaml", "/out", env={**env, **array})
        assert r.returncode == 0, r.stderr
        assert _lines(r.stdout) == _plan(tmp_path, "h100x2", ckpt, "/r.yaml", "/out", f" --shard {shard}")
    # outside an array job a --shard is the user's
    r = sh(SCRIPT, str(ckpt), "/r.yaml", "/out", "--shard", "1/2", env=env)
    assert r.returncode == 0 and _lines(r.stdout)[3].endswith("--api-key-env TANUKI_API_KEY --shard 1/2")
    # inside one, the slice is the array's
    array = {**env, "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "16"}
    r = sh(SCRIPT, str(ckpt), "/r.yaml", "/out", "--shard=1/2", env=array)
    assert r.returncode == 2 and "synth run" not in r.stdout
    assert ("[slurm] --shard 1/2 in an array job: the slice comes from the array (task 3 of 16); drop --shard"
            in r.stderr)
    r = sh(SCRIPT, str(ckpt), "/r.yaml", "/out", env={**array, "SLURM_ARRAY_TASK_STEP": "2"})
    assert r.returncode == 2 and "synth run" not in r.stdout
    assert "submit a contiguous array, e.g. --array=0-15 for 16 slices" in r.stderr


def test_refusals_before_anything_starts(tmp_path, ckpt):
    env = _env(tmp_path)
    for flag in ("--out", "--base-url=http://x/v1", "--backend", "--ckpt"):
        r = sh(SCRIPT, str(ckpt), "/r.yaml", "/out", flag, "v", env=env)
        assert r.returncode == 2 and "synth run" not in r.stdout
        assert f"[slurm] {flag.split('=')[0]} is set by this script" in r.stderr
    r = sh(SCRIPT, str(ckpt), "/r.yaml", env=env)
    assert r.returncode == 2 and "usage: [MODE=h100x2|h200|h100-fp8] slurm/synth_nemotron4.sh CKPT RECIPE OUT" \
        in r.stderr
    # serve_nemotron4_340b.sh's refusals, before anything starts: allocation, layout, checkpoint, key, FP8 on CPU
    r = sh(SCRIPT, str(ckpt), "/r.yaml", "/out", env={**env, "MODE": "h200"})  # a 2-node allocation
    assert r.returncode == 2 and "srun" not in r.stdout
    assert "[slurm] MODE=h200 runs on 1 node(s) x 8 GPUs; this job has 2 node(s) x 8 GPU(s)" in r.stderr
    assert "[slurm] the server's launch was refused (above): nothing started" in r.stderr
    r = sh(SCRIPT, str(ckpt), "/r.yaml", "/out", "--", "--pp", "1", env=env)
    assert r.returncode == 2 and "[slurm] MODE=h100x2 fixes the layout (TP=8 PP=2); --pp is not taken here" in r.stderr
    r = sh(SCRIPT, str(tmp_path / "nope"), "/r.yaml", "/out", env=env)
    assert r.returncode == 2 and f"[slurm] checkpoint {tmp_path}/nope: no such file or folder" in r.stderr
    r = sh(SCRIPT, str(ckpt), "/r.yaml", "/out", env={**env, "TANUKI_API_KEY": ""})
    assert r.returncode == 2 and "[slurm] refusing to serve on 0.0.0.0 without an API key" in r.stderr
    r = sh(SCRIPT, str(ckpt), "/r.yaml", "/out", env={**env, "MODE": "h100-fp8", "LOCAL": "1"})
    assert r.returncode == 2 and "LOCAL=1 cannot run it" in r.stderr


def test_dry_run_local_and_a_loopback_server(tmp_path, ckpt):
    env = {"LOCAL": "1", "DRY_RUN": "1", "LOG_DIR": str(tmp_path / "logs"), "PORT": "8123", "MODE": "h200"}
    r = sh(SCRIPT, str(ckpt), "/r.yaml", "/out", "--limit", "6", "--", "--chat", "tanuki", env=env)
    assert r.returncode == 0, r.stderr
    assert _lines(r.stdout)[1:] == [
        f"{PY} -m megatron_tanuki.cli serve --ckpt {ckpt} --tp 2 --pp 1 --port 8123 --chat nemotron4 --chat tanuki &",
        "# wait until GET http://127.0.0.1:8123/v1/models answers 200 (at most 3600 s)",
        f"{PY} -m megatron_tanuki.cli synth run /r.yaml --out /out --backend openai --base-url "
        "http://127.0.0.1:8123/v1 --limit 6",
        "# stop the server: SIGTERM to it"]
    # in Slurm, --host 127.0.0.1: no key, the client (on the first node) asks 127.0.0.1
    r = sh(SCRIPT, str(ckpt), "/r.yaml", "/out", "--", "--host", "127.0.0.1",
           env={**_env(tmp_path), "TANUKI_API_KEY": ""})
    assert r.returncode == 0, r.stderr
    assert f"{PY} -m megatron_tanuki.cli synth run /r.yaml --out /out --backend openai --base-url " \
           "http://127.0.0.1:8000/v1" in _lines(r.stdout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny dense checkpoint (what `tanuki convert hf-to-mcore` makes of tiny_hf.dense_model) and the
    6-conversation recipe."""
    import torch

    from megatron_tanuki.convert import engine
    from tests.convert import tiny_hf

    d = tmp_path_factory.mktemp("synth_slurm")
    tiny_hf.save(tiny_hf.dense_model(0), str(d / "hf"), dtype=torch.float32)
    engine.hf_to_mcore(str(d / "hf"), str(d / "ck"))
    (d / "topics.jsonl").write_text("".join(json.dumps({"topic": t}, ensure_ascii=False) + "\n" for t in TOPICS))
    (d / "recipe.yaml").write_text(TINY_RECIPE)
    return d


def _local_env(tmp_path, port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("RANK", "WORLD_SIZE", "TANUKI_API_KEY", "TANUKI_DEBUG", "MODE", "DRY_RUN")}
    env.update({"LOCAL": "1", "PORT": str(port), "OMP_NUM_THREADS": "1", "LOG_DIR": str(tmp_path / "logs"),
                "SERVE_WAIT": "240"})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_serves_the_teacher_and_writes_every_conversation(tiny, tmp_path):
    port = _free_port()
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "slurm", SCRIPT), str(tiny / "ck"), str(tiny / "recipe.yaml"),
                             str(out), "--", "--chat", "tanuki", "--kv-memory-gb", "0.05", "--shutdown-grace", "5"],
                            env=_local_env(tmp_path, port), cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=300)
        left = _left_in_session(proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    print(f"LOCAL=1 synth run: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, log[-4000:]
    assert left == []  # the server and its ranks are gone
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert f"[slurm] the server answers at http://127.0.0.1:{port}/v1 after " in log
    assert "tanuki synth run: 6 conversation(s) written, 0 rejected, 0 already done, 0 left for the rerun" in log
    assert "[slurm] tanuki synth run exited with status 0" in log
    (data,) = os.listdir(out / "data")
    assert data == "shard-00000-of-00001.jsonl"
    records = [json.loads(line) for line in open(out / "data" / data, encoding="utf-8")]
    assert sorted(r["index"] for r in records) == list(range(6))
    assert len({r["id"] for r in records}) == 6
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"]
        assert r["topic"] == TOPICS[r["index"]] and r["teacher"] == "tiny-dense"
        assert r["recipe"]["name"] == "tiny_synth" and len(r["finish_reasons"]) == 4
        assert all(s["max_tokens"] == 4 for s in r["sampling"].values())
    assert open(out / "recipe.yaml", encoding="utf-8").read().endswith(TINY_RECIPE)


def test_local_refuses_a_recipe_whose_template_is_not_served(tiny, tmp_path):
    """The recipe says chat: tanuki; the script serves nemotron4 unless told: refused before the server starts."""
    r = subprocess.run(["bash", os.path.join(ROOT, "slurm", SCRIPT), str(tiny / "ck"), str(tiny / "recipe.yaml"),
                        str(tmp_path / "out"), "--limit", "2"], env=_local_env(tmp_path, _free_port()),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert (f"[slurm] {tiny}/recipe.yaml: teacher.chat is tanuki, but the server renders with nemotron4: serve with "
            "-- --chat tanuki if that is the teacher's template, or fix the recipe") in r.stderr
    assert "[slurm] nothing started" in r.stderr and "[slurm] the teacher:" not in r.stderr
    assert not (tmp_path / "out").exists()


def _left_in_session(sid: int, wait_s: float = 5.0) -> list:
    """Live processes of the script's session (the server, its ranks), after up to ``wait_s`` for exiting
    ones to go; a zombie (exited, not yet reaped by init) holds nothing and does not count."""
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except (ProcessLookupError, PermissionError, psutil.Error):
                pass
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


# ------------------------------------------------------------------ Slurm mode: signals and requeue
# Stand-in srun: a fake teacher (stdlib HTTP, loopback) on the --port it is given; USR2 stands for the
# SIGTERM Slurm delivers to the ranks (fake scancel sends it, as in tests/train/test_slurm.py), on which
# it "drains" and exits 0. The client is the real `tanuki synth run`.
FAKE_TEACHER = r"""
import json, os, signal, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
log = lambda line: open(os.environ["FAKE_LOG"], "a").write(line + "\n")
log("ranks: " + " ".join(args))
latency = float(os.environ.get("FAKE_LATENCY", "0"))


class Teacher(BaseHTTPRequestHandler):
    def log_message(self, *_):
        pass

    def reply(self, body):
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply({"object": "list", "data": [{"id": "fake-nemotron4"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer " + os.environ["TANUKI_API_KEY"]:
            log("unauthorized")
        time.sleep(latency)
        text = "答え" + str(len(body["messages"]))
        self.reply({"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})


server = ThreadingHTTPServer(("127.0.0.1", port), Teacher)
server.daemon_threads = True
signal.signal(signal.SIGUSR2, lambda *_: (log("drained"), os._exit(0)))
signal.signal(signal.SIGTERM, lambda *_: (log("srun got TERM"), os._exit(1)))
ready = os.environ["FAKE_READY"]
open(ready + ".tmp", "w").write(str(os.getpid()))
os.replace(ready + ".tmp", ready)
server.serve_forever(poll_interval=0.1)
"""
FAST_RECIPE = """name: fake_teacher_synth
count: 40
teacher: {name: fake-nemotron4}
seeds:
  topic: {source: topics.jsonl}
turns:
  - {name: q1, role: user, prompt: [{role: user, content: "{topic}の問題"}]}
  - {name: a1, role: assistant, prompt: [{role: user, content: "{q1}"}]}
  - name: q2
    role: user
    prompt: [{role: user, content: "{q1}"}, {role: assistant, content: "{a1}"}, {role: user, content: "追加は？"}]
  - {name: a2, role: assistant, prompt: [{role: user, content: "{q2}"}]}
"""


def _records(out):
    path = out / "data" / "shard-00000-of-00001.jsonl"
    return [json.loads(line) for line in open(path, encoding="utf-8")] if path.exists() else []


def test_sigusr1_stops_the_client_stops_the_server_and_requeues(tmp_path):
    from tests.train.test_slurm import FAKE_SCANCEL, FAKE_SCONTROL

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!{PY}\n{FAKE_TEACHER}")
    (bin_dir / "scancel").write_text(FAKE_SCANCEL)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "topics.jsonl").write_text("".join(json.dumps({"topic": t}, ensure_ascii=False) + "\n"
                                                   for t in TOPICS))
    (tmp_path / "recipe.yaml").write_text(FAST_RECIPE)
    (tmp_path / "ck").mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("DRY_RUN", "LOCAL", "MODE")}
    env.update({**_env(tmp_path, DRY_RUN="0"), "PATH": f"{bin_dir}:{os.environ['PATH']}", "PORT": str(port),
                "MASTER_ADDR": "127.0.0.1", "FAKE_LOG": str(tmp_path / "log"), "FAKE_READY": str(tmp_path / "ready"),
                "FAKE_LATENCY": "0.2", "SERVE_POLL": "0.2", "REQUEUE_GRACE": "60", "OMP_NUM_THREADS": "1",
                "TANUKI_ALLOW_CPU": "1"})  # SLURM_GPUS_ON_NODE=8 on a machine without GPUs: the client needs none
    out = tmp_path / "out"
    cmd = ["bash", os.path.join(ROOT, "slurm", SCRIPT), str(tmp_path / "ck"), str(tmp_path / "recipe.yaml"), str(out),
           "--concurrency", "2", "--grace", "30"]
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_records(out)) < 2:  # the client is writing: the time limit comes
            assert proc.poll() is None and time.monotonic() < deadline, "\n".join(proc.communicate())
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stdout + stderr
    log = (tmp_path / "log").read_text().splitlines()
    assert log[0].startswith("ranks: --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 ")
    assert log[0].endswith(f"serve --ckpt {tmp_path}/ck --tp 8 --pp 2 --host 0.0.0.0 --port {port} --chat nemotron4 "
                           "--dtype bf16")
    assert log[1:] == ["scancel --signal=TERM 4242", "drained", "requeue 4242"]  # never "srun got TERM"
    assert "[slurm] requeueing job 4242: the time limit came with conversations left" in stderr
    first = _records(out)
    summary = json.load(open(out / "summary" / "shard-00000-of-00001.json"))
    assert summary["stopped"] is True and summary["abandoned"] == 0
    assert 2 <= len(first) == summary["completed"] < 40
    assert len({r["id"] for r in first}) == len(first)

    # the requeued job: the same command, the client skips what is done; complete -> not requeued
    (tmp_path / "ready").unlink()
    env["FAKE_LATENCY"] = "0"
    r = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"tanuki synth run: {40 - len(first)} conversation(s) written, 0 rejected, {len(first)} already done" \
        in r.stdout
    assert f"[slurm] OUT={out}: 0/1 complete" in r.stderr
    log = (tmp_path / "log").read_text().splitlines()
    assert log[4:] == [log[0], "scancel --signal=TERM 4242", "drained"]  # no second requeue
    final = _records(out)
    assert final[:len(first)] == first and sorted(r["index"] for r in final) == list(range(40))
