"""`tanuki serve` end to end through the official ``openai`` client, as a user runs it.

The server is a subprocess (``tanuki serve`` on 127.0.0.1, a free port, an API key) on tiny fp32
checkpoints converted by ``tanuki convert hf-to-mcore``; the references are ``tanuki generate``
runs on the same checkpoint. What must hold:
- greedy text through the server (sync and async client, chat and completions, streamed and not)
  equals the offline engine's, token counts and finish reasons included; a streamed answer is the
  non-streamed one cut into pieces (stop strings too);
- a seeded sampled request gives the same text alone, again, and among 15 other requests;
- Tanuki-vision with a base64 image equals `tanuki generate` with the same image file;
- 64 concurrent streams all complete with the offline texts; 16 clients that hang up mid-stream
  leave no KV blocks behind;
- TP=2 over 2 gloo ranks answers as TP=1;
- a wrong key is the client's AuthenticationError; SIGTERM during two streams: the short one
  finishes, the long one finishes or ends with the shutdown error event (never a cut connection),
  the server exits 0.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
import httpx  # noqa: E402  (openai's own dependency)

from megatron_tanuki.serve.loop import SHUTDOWN_ERROR  # noqa: E402

TANUKI = os.path.join(os.path.dirname(sys.executable), "tanuki")
KEY = "sk-tanuki-test"
GRACE = 1.0
SMALL = ["--kv-memory-gb", "0.05", "--max-seq-len", "256"]
ENV = {**{k: v for k, v in os.environ.items()
          if k not in ("RANK", "SLURM_PROCID", "SLURM_STEP_ID", "TANUKI_DEBUG", "TANUKI_API_KEY")},
       "OMP_NUM_THREADS": "1"}

CHATS = {
    "c0": [{"role": "user", "content": "日本の首都はどこですか"}],
    "c1": [{"role": "system", "content": "あなたは親切なアシスタントです。"},
           {"role": "user", "content": "猫について教えて"},
           {"role": "assistant", "content": "猫は小さな動物です。"},
           {"role": "user", "content": "もっと詳しく"}],
}
PROMPTS = {"p0": "日本の首都は", "p1": "昔々あるところに"}
MAX_TOKENS = 8
CROWD = 64


def crowd(i: int) -> tuple[str, object, int]:
    """Client i of the 64: (kind, messages or prompt, max_tokens); chat and completions alternate,
    lengths differ so they finish at different steps."""
    text = f"質問{i}: " + "猫と犬" * (i % 5)
    if i % 2 == 0:
        return "chat", [{"role": "user", "content": text}], 3 + i % 6
    return "completion", text, 3 + i % 6


def tanuki(cwd, *args, timeout=300):
    return subprocess.run([TANUKI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=ENV)


def generate(cwd, name: str, records: list[dict], *args) -> dict:
    """`tanuki generate --temperature 0` on ``records``; the answers by id."""
    with open(os.path.join(cwd, f"{name}.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    r = tanuki(cwd, "generate", "--ckpt", "ck", "--input", f"{name}.jsonl", "--output", f"{name}.out.jsonl",
               "--temperature", 0, *SMALL, *args)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(cwd, f"{name}.out.jsonl"), encoding="utf-8") as f:
        out = {rec["id"]: rec for rec in map(json.loads, f)}
    assert sorted(out) == sorted(r["id"] for r in records) and all("error" not in v for v in out.values()), out
    return out


class Server:
    """One `tanuki serve` subprocess (its own session), ready when GET /health answers."""

    def __init__(self, cwd, ckpt: str, *extra, ready_s: float = 240):
        from megatron_tanuki.runtime.spawn import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(cwd, f"serve-{self.port}.log")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [TANUKI, "serve", "--ckpt", ckpt, "--port", str(self.port), "--api-key", KEY, *SMALL,
                 "--shutdown-grace", str(GRACE), *map(str, extra)],
                cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
        deadline = time.monotonic() + ready_s
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"tanuki serve exited with {self.proc.returncode} before it was ready:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"tanuki serve not ready within {ready_s} s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def aclient(self, key: str = KEY):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        """The unlabelled series of GET /metrics."""
        r = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 200, r.text
        out = {}
        for line in r.text.splitlines():
            parts = line.split()
            if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
                out[parts[0]] = float(parts[1])
        return out

    def wait_idle(self, timeout: float = 60) -> dict[str, float]:
        """Metrics once no request is running or waiting (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["tanuki_engine_requests_running"] == 0 and m["tanuki_engine_requests_waiting"] == 0:
                return m
            assert time.monotonic() < deadline, f"still busy after {timeout} s: {m}"
            time.sleep(0.2)

    def stop(self) -> int:
        """SIGTERM (to `tanuki serve` itself; with --nproc it forwards to its ranks); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=GRACE + 60)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"tanuki serve still running {GRACE + 60} s after SIGTERM:\n{self.log()}")

    def kill(self) -> None:
        """Last resort: the server's own process group (it was started in a new session)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


# --------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with ``ck``: the tiny Tanuki MoE (fp32) converted by `tanuki convert hf-to-mcore`."""
    from tests.convert import tiny_hf

    d = tmp_path_factory.mktemp("serve_openai")
    tiny_hf.save(tiny_hf.moe_model(0), str(d / "hf"), dtype=torch.float32)
    r = tanuki(d, "convert", "hf-to-mcore", "--hf", "hf", "--out", "ck")
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture(scope="module")
def refs(work):
    """The offline engine's greedy answers: chat messages with the tanuki template, completions
    prompts as raw text (``--chat none``)."""
    chat = [{"id": k, "messages": m, "max_tokens": MAX_TOKENS} for k, m in CHATS.items()]
    raw = [{"id": k, "prompt": p, "max_tokens": MAX_TOKENS} for k, p in PROMPTS.items()]
    for i in range(CROWD):
        kind, what, n = crowd(i)
        (chat if kind == "chat" else raw).append(
            {"id": f"x{i}", "messages" if kind == "chat" else "prompt": what, "max_tokens": n})
    return {**generate(work, "chat", chat, "--chat", "tanuki"), **generate(work, "raw", raw, "--chat", "none")}


@pytest.fixture(scope="module")
def server(work):
    s = Server(work, "ck")
    yield s
    if s.proc.poll() is None:  # the SIGTERM test did not run (a selection): stop it here
        assert s.stop() == 0, s.log()


# --------------------------------------------------------------------------------- helpers

def model_id(s: Server) -> str:
    return s.client().models.list().data[0].id


def ask_sync(client, model: str, kind: str, what, max_tokens: int, stream: bool, **kw) -> dict:
    """One request through the sync client: text, finish_reason, usage (dict), chunk count."""
    args = dict(model=model, max_tokens=max_tokens, temperature=kw.pop("temperature", 0), **kw)
    if stream:
        args["stream_options"] = {"include_usage": True}
    if kind == "chat":
        r = client.chat.completions.create(messages=what, stream=stream, **args)
    else:
        r = client.completions.create(prompt=what, stream=stream, **args)
    if not stream:
        c = r.choices[0]
        return {"text": c.message.content if kind == "chat" else c.text, "finish_reason": c.finish_reason,
                "usage": counts(r.usage), "chunks": 1, "id": r.id}
    return collect(list(r), kind)


def collect(chunks, kind: str) -> dict:
    text, finish, usage, ids = "", None, None, set()
    for ch in chunks:
        ids.add(ch.id)
        if ch.usage is not None:
            usage = counts(ch.usage)
        for c in ch.choices:
            assert c.index == 0
            piece = c.delta.content if kind == "chat" else c.text
            text += piece or ""
            if c.finish_reason is not None:
                assert finish is None, "two chunks carry a finish_reason"
                finish = c.finish_reason
    assert len(ids) == 1, f"one id for all chunks of a stream, got {ids}"
    return {"text": text, "finish_reason": finish, "usage": usage, "chunks": len(chunks), "id": ids.pop()}


def expected(ref: dict) -> dict:
    return {"text": ref["text"], "finish_reason": ref["finish_reason"],
            "usage": {"prompt_tokens": ref["prompt_tokens"], "completion_tokens": ref["completion_tokens"],
                      "total_tokens": ref["prompt_tokens"] + ref["completion_tokens"]}}


def counts(usage) -> dict:
    return {k: getattr(usage, k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def answer(got: dict) -> dict:
    return {k: got[k] for k in ("text", "finish_reason", "usage")}


# --------------------------------------------------------------------------------- tests

def test_sync_client_greedy_equals_generate(server, refs):
    """Chat and completions, streamed and not: the offline engine's text, finish reason and token
    counts; a stream arrives in more than one piece."""
    client, model = server.client(), model_id(server)
    cases = [("chat", k, m) for k, m in CHATS.items()] + [("completion", k, p) for k, p in PROMPTS.items()]
    for kind, key, what in cases:
        for stream in (False, True):
            got = ask_sync(client, model, kind, what, MAX_TOKENS, stream)
            assert answer(got) == expected(refs[key]), (kind, key, stream)
            assert got["id"].startswith("chatcmpl-" if kind == "chat" else "cmpl-")
            if stream:
                assert got["chunks"] > 3, got
    assert refs["c0"]["finish_reason"] == "length" and refs["c0"]["completion_tokens"] == MAX_TOKENS


def test_stop_string_streamed_equals_non_streamed(server, refs):
    """A stop string from the middle of the greedy answer: the text ends before it, streamed or not
    (the stream must not send the stop string, nor the one token the engine takes after it)."""
    client, model = server.client(), model_id(server)
    full = refs["c0"]["text"]
    for stop in (full[len(full) // 2:len(full) // 2 + 2], full[len(full) // 2]):
        want = full[:full.find(stop)]
        for stream in (False, True):
            got = ask_sync(client, model, "chat", CHATS["c0"], MAX_TOKENS, stream, stop=[stop])
            assert (got["text"], got["finish_reason"]) == (want, "stop"), (stop, stream)


def test_async_client_greedy_equals_generate(server, refs):
    """The async client, all four shapes at once."""
    async def one(client, model, kind, what, stream):
        args = dict(model=model, max_tokens=MAX_TOKENS, temperature=0, stream=stream)
        if stream:
            args["stream_options"] = {"include_usage": True}
        if kind == "chat":
            r = await client.chat.completions.create(messages=what, **args)
        else:
            r = await client.completions.create(prompt=what, **args)
        if not stream:
            c = r.choices[0]
            return {"text": c.message.content if kind == "chat" else c.text, "finish_reason": c.finish_reason,
                    "usage": counts(r.usage)}
        return answer(collect([ch async for ch in r], kind))

    async def main():
        async with server.aclient() as client:
            model = (await client.models.list()).data[0].id
            cases = [("chat", "c0", CHATS["c0"]), ("chat", "c1", CHATS["c1"]),
                     ("completion", "p0", PROMPTS["p0"]), ("completion", "p1", PROMPTS["p1"])]
            jobs = [one(client, model, kind, what, stream) for kind, _, what in cases for stream in (False, True)]
            got = await asyncio.wait_for(asyncio.gather(*jobs), 120)
            return {(key, stream): g for (_, key, _), pair in zip(cases, zip(got[::2], got[1::2]))
                    for stream, g in zip((False, True), pair)}

    got = asyncio.run(main())
    for (key, stream), g in got.items():
        assert g == expected(refs[key]), (key, stream)


def test_seeded_sampling_is_reproducible_alone_and_in_a_crowd(server):
    """temperature 0.8, top_p 0.9, seed 5: the same text twice alone and once among 15 other
    requests (the engine's noise depends on the seed and the position, not on the batch)."""
    client, model = server.client(), model_id(server)
    sampled = dict(temperature=0.8, top_p=0.9, seed=5)
    first = ask_sync(client, model, "chat", CHATS["c0"], 16, False, **sampled)
    again = ask_sync(client, model, "chat", CHATS["c0"], 16, False, **sampled)
    streamed = ask_sync(client, model, "chat", CHATS["c0"], 16, True, **sampled)
    greedy = ask_sync(client, model, "chat", CHATS["c0"], 16, False)
    assert answer(again) == answer(first) and answer(streamed) == answer(first)
    assert first["text"] != greedy["text"]  # it did sample

    async def main():
        async with server.aclient() as client:
            others = [client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"別の質問{i}"}], max_tokens=16 + i,
                temperature=0.8, top_p=0.9, seed=100 + i) for i in range(15)]
            mine = client.chat.completions.create(model=model, messages=CHATS["c0"], max_tokens=16, **sampled)
            got = await asyncio.wait_for(asyncio.gather(*others[:7], mine, *others[7:]), 120)
            return got[7]

    crowded = asyncio.run(main())
    assert (crowded.choices[0].message.content, crowded.choices[0].finish_reason) == \
        (first["text"], first["finish_reason"])


def test_64_streams_then_16_hang_ups_free_their_kv(server, refs):
    """64 concurrent streams: every one completes with the offline engine's text. Then 16 long
    streams whose clients hang up after 3 chunks: their requests are cancelled (the engine stops
    long before it could have generated their 200 tokens) and the KV cache use returns to its idle
    level."""
    idle = server.wait_idle()

    async def stream_one(client, model, i):
        kind, what, n = crowd(i)
        args = dict(model=model, max_tokens=n, temperature=0, stream=True, stream_options={"include_usage": True})
        if kind == "chat":
            s = await client.chat.completions.create(messages=what, **args)
        else:
            s = await client.completions.create(prompt=what, **args)
        return answer(collect([ch async for ch in s], kind))

    async def hang_up(client, model, i):
        s = await client.completions.create(model=model, prompt=f"長い話{i}: むかしむかし", max_tokens=200,
                                            temperature=0, stream=True)
        n = 0
        async for _ in s:
            n += 1
            if n == 3:
                break
        await s.close()
        return n

    async def crowd_of(job, count: int, timeout: float):
        async with server.aclient() as client:
            model = (await client.models.list()).data[0].id
            return await asyncio.wait_for(asyncio.gather(*(job(client, model, i) for i in range(count))), timeout)

    got = asyncio.run(crowd_of(stream_one, CROWD, 150))
    assert len(got) == CROWD
    wrong = [i for i in range(CROWD) if got[i] != expected(refs[f"x{i}"])]
    assert not wrong, [(i, got[i], refs[f"x{i}"]) for i in wrong[:3]]
    between = server.wait_idle()
    assert between["tanuki_kv_cache_usage_ratio"] == idle["tanuki_kv_cache_usage_ratio"], (idle, between)

    assert asyncio.run(crowd_of(hang_up, 16, 120)) == [3] * 16
    after = server.wait_idle()
    assert after["tanuki_kv_cache_usage_ratio"] == idle["tanuki_kv_cache_usage_ratio"], (idle, after)
    # one token per step: uncancelled, the 16 requests would have taken at least 200 steps
    assert after["tanuki_engine_steps_total"] - between["tanuki_engine_steps_total"] < 190, (between, after)


def test_wrong_key_is_an_authentication_error(server):
    client = server.client(key="sk-wrong")
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="ck", messages=CHATS["c0"], max_tokens=1)
    assert e.value.status_code == 401
    assert (e.value.body["type"], e.value.body["code"]) == ("invalid_request_error", "invalid_api_key")


def test_tp2_answers_as_tp1(work, refs):
    """TP=2 over 2 gloo ranks (MoE: sequence parallel on) gives TP=1's greedy answers (the offline
    engine's, which the TP=1 server gives: test_sync_client_greedy_equals_generate)."""
    s = Server(work, "ck", "--tp", 2, "--nproc", 2)
    try:
        client, model = s.client(), model_id(s)
        for kind, key, what in [("chat", "c0", CHATS["c0"]), ("chat", "c1", CHATS["c1"]),
                                ("completion", "p0", PROMPTS["p0"])]:
            for stream in (False, True):
                got = ask_sync(client, model, kind, what, MAX_TOKENS, stream)
                assert answer(got) == expected(refs[key]), (kind, key, stream)
    finally:
        assert s.stop() == 0, s.log()


def test_vision_base64_image_equals_generate(tmp_path):
    """Tanuki-vision: an image as a data: URL in the chat content parts gives `tanuki generate`'s
    greedy answer for the same image file and text."""
    from megatron_tanuki.data.images import sample_image
    from tests.convert import tiny_llava

    paths = tiny_llava.build(str(tmp_path), moe=False, dtype=torch.float32)
    r = tanuki(tmp_path, "convert", "hf-to-mcore", "--hf", paths["llava"], "--out", "ck")
    assert r.returncode == 0, r.stderr
    sample_image(64).save(tmp_path / "img.png")
    question = "この画像を説明してください"
    ref = generate(tmp_path, "vision", [{"id": "v", "prompt": question, "image": "img.png",
                                         "max_tokens": MAX_TOKENS}])["v"]
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "img.png").read_bytes()).decode()
    s = Server(tmp_path, "ck")
    try:
        client, model = s.client(), model_id(s)
        content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
        for stream in (False, True):
            got = ask_sync(client, model, "chat", [{"role": "user", "content": content}], MAX_TOKENS, stream)
            assert answer(got) == expected(ref), stream
    finally:
        assert s.stop() == 0, s.log()


def test_sigterm_mid_stream_drains_then_cuts_and_exits_0(server):
    """SIGTERM while two streams run: the short one finishes within the grace period; the long one
    (240 tokens, more than the grace period's worth of steps here) either finishes too or is cut
    with the shutdown error event; the server exits 0. Runs last: it stops the module's server."""
    client, model = server.client(), model_id(server)
    ended, chunks = {}, {"short": [], "long": []}

    def read(name, max_tokens):
        try:
            stream = client.completions.create(model=model, prompt=f"{name}: むかしむかし", max_tokens=max_tokens,
                                               temperature=0, stream=True)
            for ch in stream:
                chunks[name].append(ch)
            ended[name] = "finished"
        except openai.APIError as e:
            ended[name] = e.message

    readers = {"long": threading.Thread(target=read, args=("long", 240), daemon=True),
               "short": threading.Thread(target=read, args=("short", 10), daemon=True)}
    readers["long"].start()
    deadline = time.monotonic() + 60
    while len(chunks["long"]) < 3:
        assert time.monotonic() < deadline and readers["long"].is_alive(), ended
        time.sleep(0.005)
    readers["short"].start()
    while not chunks["short"]:
        assert time.monotonic() < deadline and readers["short"].is_alive(), ended
        time.sleep(0.005)
    t0 = time.monotonic()
    assert server.stop() == 0, server.log()
    assert time.monotonic() - t0 < GRACE + 30
    for t in readers.values():
        t.join(timeout=30)
    assert ended.get("short") == "finished", ended
    assert [c.finish_reason for ch in chunks["short"] for c in ch.choices if c.finish_reason] == ["length"]
    assert ended.get("long") in ("finished", SHUTDOWN_ERROR), ended
    assert f"SIGTERM: draining (up to {GRACE:g} s)" in server.log()
